//! Aggregations and the partial-aggregate fields they need.

use std::fmt;
use std::str::FromStr;

/// An aggregation a feature computes over the events of its window.
///
/// # Nulls
/// Null and NaN values are skipped by every aggregation that reads a column.
/// On an empty window `Count`, `Sum`, `DecayedSum` and `DecayedCount` are 0 and every
/// other aggregation is null.
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
    /// Value of the event with the smallest timestamp (ties: the one ingested first).
    First,
    /// `Σ v · 2^(−(t − e.ts) / half_life)` over the window's values, at read time `t`.
    DecayedSum {
        /// Half-life in milliseconds (> 0).
        half_life: i64,
    },
    /// `Σ 2^(−(t − e.ts) / half_life)` over the window's values (or rows, without a
    /// column), at read time `t`.
    DecayedCount {
        /// Half-life in milliseconds (> 0).
        half_life: i64,
    },
}

impl Agg {
    /// Every aggregation, in a fixed order (tests and docs iterate it); the decayed
    /// ones with a half-life of one hour.
    pub const ALL: [Agg; 11] = [
        Agg::Count,
        Agg::Sum,
        Agg::Mean,
        Agg::Min,
        Agg::Max,
        Agg::Var,
        Agg::Std,
        Agg::Last,
        Agg::First,
        Agg::DecayedSum {
            half_life: 3_600_000,
        },
        Agg::DecayedCount {
            half_life: 3_600_000,
        },
    ];

    /// The aggregation named `name`, with its parameters.
    ///
    /// # Errors
    /// A message for an unknown name, a missing or non-positive `half_life` of a
    /// decayed aggregation, or a `half_life` given to any other aggregation.
    pub fn with_params(name: &str, half_life: Option<i64>) -> Result<Agg, String> {
        let Some(kind) = Agg::ALL.into_iter().find(|a| a.name() == name) else {
            let names: Vec<_> = Agg::ALL.iter().map(|a| a.name()).collect();
            return Err(format!(
                "unknown aggregation {name:?}; expected one of {}",
                names.join(", ")
            ));
        };
        match (kind, half_life) {
            (Agg::DecayedSum { .. } | Agg::DecayedCount { .. }, None) => Err(format!(
                "`{name}` needs a `half_life`, e.g. half_life = \"1h\""
            )),
            (Agg::DecayedSum { .. } | Agg::DecayedCount { .. }, Some(h)) if h <= 0 => {
                Err(format!("`half_life` must be positive, got {h} ms"))
            }
            (Agg::DecayedSum { .. }, Some(half_life)) => Ok(Agg::DecayedSum { half_life }),
            (Agg::DecayedCount { .. }, Some(half_life)) => Ok(Agg::DecayedCount { half_life }),
            (_, Some(_)) => Err(format!(
                "`half_life` applies to decayed_sum and decayed_count, not to `{name}`"
            )),
            (a, None) => Ok(a),
        }
    }

    /// Position of the aggregation's kind in [`Agg::ALL`] (the shaders' code for it).
    pub fn code(self) -> u32 {
        match self {
            Agg::Count => 0,
            Agg::Sum => 1,
            Agg::Mean => 2,
            Agg::Min => 3,
            Agg::Max => 4,
            Agg::Var => 5,
            Agg::Std => 6,
            Agg::Last => 7,
            Agg::First => 8,
            Agg::DecayedSum { .. } => 9,
            Agg::DecayedCount { .. } => 10,
        }
    }

    /// The half-life of a decayed aggregation, ms.
    pub fn half_life(self) -> Option<i64> {
        match self {
            Agg::DecayedSum { half_life } | Agg::DecayedCount { half_life } => Some(half_life),
            _ => None,
        }
    }

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
            Agg::First => "first",
            Agg::DecayedSum { .. } => "decayed_sum",
            Agg::DecayedCount { .. } => "decayed_count",
        }
    }

    /// Whether the aggregation needs a value column (`count` and `decayed_count` do not:
    /// without one they count rows).
    pub fn needs_column(self) -> bool {
        !matches!(self, Agg::Count | Agg::DecayedCount { .. })
    }

    /// Whether every backend and every grouping of the events gives the same bits
    /// (`count`, `min`, `max`, `last`, `first`); the others are floating-point sums,
    /// equal to 1e-9 relative.
    pub fn bitwise(self) -> bool {
        matches!(
            self,
            Agg::Count | Agg::Min | Agg::Max | Agg::Last | Agg::First
        )
    }

    /// Whether an empty window yields a value (0) rather than null.
    pub fn zero_when_empty(self) -> bool {
        matches!(
            self,
            Agg::Count | Agg::Sum | Agg::DecayedSum { .. } | Agg::DecayedCount { .. }
        )
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
            Agg::First => f.first = true,
            Agg::DecayedSum { half_life } | Agg::DecayedCount { half_life } => {
                f.decay = Some(half_life)
            }
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

    /// An aggregation without parameters (see [`Agg::with_params`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Agg::with_params(s, None)
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
    /// Value and timestamp of the earliest event.
    pub first: bool,
    /// Half-life (ms) of the decayed sums kept for the column: the latest time, and the
    /// sums of `2^(−(latest − e.ts) / half_life)` and of `v` times it. A view gives each
    /// half-life of a column its own value column.
    pub decay: Option<i64>,
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
            first: self.first | o.first,
            decay: self.decay.or(o.decay),
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
            + 2 * self.last as usize
            + 2 * self.first as usize
            + 3 * self.decay.is_some() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Agg::ALL.into_iter().filter(|a| a.half_life().is_none()) {
            assert_eq!(a.name().parse::<Agg>().unwrap(), a);
        }
        let err = "median".parse::<Agg>().unwrap_err();
        assert!(err.contains("unknown aggregation \"median\""), "{err}");
        assert!(err.contains("count, sum, mean"), "{err}");
    }

    #[test]
    fn half_life_goes_with_the_decayed_aggregations_only() {
        for (i, a) in Agg::ALL.into_iter().enumerate() {
            assert_eq!(a.code() as usize, i);
            let parsed = Agg::with_params(a.name(), a.half_life()).unwrap();
            assert_eq!(parsed, a);
            let wrong = Agg::with_params(a.name(), a.half_life().xor(Some(1)));
            assert!(wrong.is_err(), "{a}");
        }
        assert_eq!(
            Agg::with_params("decayed_sum", Some(5)),
            Ok(Agg::DecayedSum { half_life: 5 })
        );
        let err = Agg::with_params("decayed_count", Some(0)).unwrap_err();
        assert!(err.contains("must be positive"), "{err}");
        let err = "decayed_sum".parse::<Agg>().unwrap_err();
        assert!(err.contains("needs a `half_life`"), "{err}");
        let err = Agg::with_params("mean", Some(1)).unwrap_err();
        assert!(err.contains("not to `mean`"), "{err}");
    }
}
