//! Aggregations and the partial-aggregate fields they need.

use std::fmt;
use std::str::FromStr;

/// An aggregation a feature computes over the events of its window.
///
/// # Nulls
/// Null and NaN values are skipped by every aggregation that reads a column.
/// On an empty window `Count` and `Sum` are 0 and every other aggregation is null.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Agg {
    /// Number of rows (no column) or of non-null, non-NaN values of a column.
    Count,
    /// Sum of the values.
    Sum,
    /// Arithmetic mean of the values.
    Mean,
    /// Smallest value; −0.0 is below +0.0 (IEEE 754-2019 `minimum`), so the bits of
    /// the answer do not depend on how events were grouped.
    Min,
    /// Largest value; +0.0 is above −0.0 (IEEE 754-2019 `maximum`).
    Max,
    /// Sample variance (n − 1); null for fewer than two values.
    Var,
    /// Sample standard deviation (n − 1); null for fewer than two values.
    Std,
    /// Value of the event with the greatest timestamp (ties: the one ingested last).
    Last,
}

impl Agg {
    /// Every aggregation, in a fixed order (tests and docs iterate it).
    pub const ALL: [Agg; 8] = [
        Agg::Count,
        Agg::Sum,
        Agg::Mean,
        Agg::Min,
        Agg::Max,
        Agg::Var,
        Agg::Std,
        Agg::Last,
    ];

    /// The name used in feature files.
    pub fn name(self) -> &'static str {
        match self {
            Agg::Count => "count",
            Agg::Sum => "sum",
            Agg::Mean => "mean",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Var => "var",
            Agg::Std => "std",
            Agg::Last => "last",
        }
    }

    /// Whether the aggregation needs a value column (`count` does not).
    pub fn needs_column(self) -> bool {
        !matches!(self, Agg::Count)
    }

    /// Whether an empty window yields a value (0) rather than null.
    pub fn zero_when_empty(self) -> bool {
        matches!(self, Agg::Count | Agg::Sum)
    }

    /// The partial-aggregate fields this aggregation reads from a column.
    pub fn fields(self) -> ColumnFields {
        let mut f = ColumnFields {
            count: true,
            ..ColumnFields::default()
        };
        match self {
            Agg::Count => {}
            Agg::Sum | Agg::Mean => f.sum = true,
            Agg::Min => f.min = true,
            Agg::Max => f.max = true,
            Agg::Var | Agg::Std => f.moments = true,
            Agg::Last => f.last = true,
        }
        f
    }
}

impl fmt::Display for Agg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Agg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Agg::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<_> = Agg::ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown aggregation {s:?}; expected one of {}",
                names.join(", ")
            )
        })
    }
}

/// Which partial-aggregate fields a level stores for one value column.
///
/// `count` (non-null values) is stored whenever any other field is, because every
/// value aggregation needs it to tell an empty window from a zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColumnFields {
    /// Count of non-null, non-NaN values.
    pub count: bool,
    /// Plain sum (for `sum` and `mean`).
    pub sum: bool,
    /// Per-cell shift and shifted first and second moments (for `var` and `std`).
    pub moments: bool,
    /// Running minimum.
    pub min: bool,
    /// Running maximum.
    pub max: bool,
    /// Value and timestamp of the latest event.
    pub last: bool,
}

impl ColumnFields {
    /// Field-wise union.
    pub fn union(self, o: ColumnFields) -> ColumnFields {
        ColumnFields {
            count: self.count | o.count,
            sum: self.sum | o.sum,
            moments: self.moments | o.moments,
            min: self.min | o.min,
            max: self.max | o.max,
            last: self.last | o.last,
        }
    }

    /// Whether nothing is stored for the column.
    pub fn is_empty(self) -> bool {
        self == ColumnFields::default()
    }

    /// Bytes stored per pane for this column.
    pub fn bytes_per_pane(self) -> usize {
        8 * (self.count as usize
            + self.sum as usize
            + 3 * self.moments as usize
            + self.min as usize
            + self.max as usize
            + 2 * self.last as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Agg::ALL {
            assert_eq!(a.name().parse::<Agg>().unwrap(), a);
        }
        let err = "median".parse::<Agg>().unwrap_err();
        assert!(err.contains("unknown aggregation \"median\""), "{err}");
        assert!(err.contains("count, sum, mean"), "{err}");
    }
}
