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
    /// Number of distinct values: exact for few, then a HyperLogLog estimate (see
    /// [`crate::hll`]); the column carries each value's hash as [`crate::hll::value`].
    ApproxDistinct {
        /// Registers `2^precision`, `precision` in [`crate::hll::PRECISIONS`].
        precision: u8,
    },
    /// The `q`-quantile `v[⌊q · (n − 1)⌋]` of the sorted values, within
    /// `relative_accuracy · |v|` (a DDSketch, see [`crate::quantile`]).
    Quantile {
        /// In [0, 1].
        q: Param,
        /// Relative accuracy α, in [`crate::quantile::ACCURACY`].
        relative_accuracy: Param,
    },
    /// The values of the `n` events with the greatest (time, arrival), newest first: a
    /// list (see [`crate::lastn`]).
    LastN {
        /// 1 to [`crate::lastn::MAX_N`].
        n: u16,
    },
    /// The `k` most frequent values, most frequent first (ties: smaller value first): a
    /// list, exact while the window holds at most `capacity` distinct values (see
    /// [`crate::topk`]).
    TopK {
        /// 1 to [`crate::topk::MAX_K`].
        k: u16,
        /// Counters kept, `k` to [`crate::topk::MAX_CAPACITY`].
        capacity: u16,
    },
}

/// An f64 parameter of an aggregation, kept by its bits so that an [`Agg`] is `Eq` and
/// `Hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Param(u64);

impl Param {
    /// The parameter `x`.
    pub const fn new(x: f64) -> Param {
        Param(x.to_bits())
    }

    /// Its value.
    pub const fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Debug for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

/// The parameters of a feature's aggregation, as given; [`Agg::with_params`] checks
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AggParams {
    /// `half_life` of `decayed_sum` and `decayed_count`, ms.
    pub half_life: Option<i64>,
    /// `precision` of `approx_distinct`.
    pub precision: Option<i64>,
    /// `q` of `quantile`.
    pub q: Option<f64>,
    /// `relative_accuracy` of `quantile`.
    pub relative_accuracy: Option<f64>,
    /// `n` of `last_n`.
    pub n: Option<i64>,
    /// `k` of `top_k`.
    pub k: Option<i64>,
    /// `capacity` of `top_k`.
    pub capacity: Option<i64>,
}

impl Agg {
    /// Every aggregation, in a fixed order (tests and docs iterate it); the decayed
    /// ones with a half-life of one hour.
    pub const ALL: [Agg; 15] = [
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
        Agg::ApproxDistinct { precision: 12 },
        Agg::Quantile {
            q: Param::new(0.5),
            relative_accuracy: Param::new(0.01),
        },
        Agg::LastN { n: 5 },
        Agg::TopK { k: 3, capacity: 64 },
    ];

    /// The aggregation named `name`, with its parameters.
    ///
    /// # Errors
    /// The field at fault (`agg` or a parameter's name) and a message: an unknown
    /// name, a missing or out-of-range parameter, or a parameter the aggregation does
    /// not take.
    pub fn with_params(name: &str, params: &AggParams) -> Result<Agg, (&'static str, String)> {
        let Some(kind) = Agg::ALL.into_iter().find(|a| a.name() == name) else {
            let names: Vec<_> = Agg::ALL.iter().map(|a| a.name()).collect();
            return Err((
                "agg",
                format!(
                    "unknown aggregation {name:?}; expected one of {}",
                    names.join(", ")
                ),
            ));
        };
        let AggParams {
            half_life,
            precision,
            q,
            relative_accuracy,
            n,
            k,
            capacity,
        } = *params;
        let decayed = matches!(kind, Agg::DecayedSum { .. } | Agg::DecayedCount { .. });
        let distinct = matches!(kind, Agg::ApproxDistinct { .. });
        let quantile = matches!(kind, Agg::Quantile { .. });
        let not_for = |field: &'static str, for_: &str| {
            Err((
                field,
                format!("`{field}` applies to {for_}, not to `{name}`"),
            ))
        };
        if half_life.is_some() && !decayed {
            return not_for("half_life", "decayed_sum and decayed_count");
        }
        if precision.is_some() && !distinct {
            return not_for("precision", "approx_distinct");
        }
        if q.is_some() && !quantile {
            return not_for("q", "quantile");
        }
        if relative_accuracy.is_some() && !quantile {
            return not_for("relative_accuracy", "quantile");
        }
        if n.is_some() && !matches!(kind, Agg::LastN { .. }) {
            return not_for("n", "last_n");
        }
        if k.is_some() && !matches!(kind, Agg::TopK { .. }) {
            return not_for("k", "top_k");
        }
        if capacity.is_some() && !matches!(kind, Agg::TopK { .. }) {
            return not_for("capacity", "top_k");
        }
        let half_life = || match half_life {
            None => Err((
                "half_life",
                format!("`{name}` needs a `half_life`, e.g. half_life = \"1h\""),
            )),
            Some(h) if h <= 0 => Err(("half_life", format!("must be positive, got {h} ms"))),
            Some(h) => Ok(h),
        };
        Ok(match kind {
            Agg::DecayedSum { .. } => Agg::DecayedSum {
                half_life: half_life()?,
            },
            Agg::DecayedCount { .. } => Agg::DecayedCount {
                half_life: half_life()?,
            },
            Agg::ApproxDistinct { precision: default } => {
                let p = precision.unwrap_or(i64::from(default));
                let range = crate::hll::PRECISIONS;
                match u8::try_from(p).ok().filter(|p| range.contains(p)) {
                    Some(precision) => Agg::ApproxDistinct { precision },
                    None => {
                        return Err((
                            "precision",
                            format!(
                                "must be from {} to {} (2^precision registers), got {p}",
                                range.start(),
                                range.end()
                            ),
                        ));
                    }
                }
            }
            Agg::Quantile {
                relative_accuracy: default,
                ..
            } => {
                let q = match q {
                    None => {
                        return Err(("q", "`quantile` needs a `q`, e.g. q = 0.9".to_string()));
                    }
                    Some(q) if (0.0..=1.0).contains(&q) => q,
                    Some(q) => return Err(("q", format!("must be in [0, 1], got {q}"))),
                };
                let (lo, hi) = crate::quantile::ACCURACY;
                let alpha = relative_accuracy.unwrap_or(default.get());
                if !(lo..=hi).contains(&alpha) {
                    return Err((
                        "relative_accuracy",
                        format!("must be in [{lo}, {hi}], got {alpha}"),
                    ));
                }
                Agg::Quantile {
                    q: Param::new(q),
                    relative_accuracy: Param::new(alpha),
                }
            }
            Agg::TopK { .. } => {
                let (max_k, max_c) = (crate::topk::MAX_K, crate::topk::MAX_CAPACITY);
                let k = match k {
                    None => return Err(("k", "`top_k` needs a `k`, e.g. k = 5".to_string())),
                    Some(k) => match u16::try_from(k).ok().filter(|k| (1..=max_k).contains(k)) {
                        Some(k) => k,
                        None => return Err(("k", format!("must be from 1 to {max_k}, got {k}"))),
                    },
                };
                let c = capacity.unwrap_or(i64::from(crate::topk::default_capacity(k)));
                match u16::try_from(c).ok().filter(|c| (k..=max_c).contains(c)) {
                    Some(capacity) => Agg::TopK { k, capacity },
                    None => {
                        return Err((
                            "capacity",
                            format!("must be from k ({k}) to {max_c}, got {c}"),
                        ));
                    }
                }
            }
            Agg::LastN { .. } => {
                let max = crate::lastn::MAX_N;
                match n.map(|n| u16::try_from(n).ok().filter(|n| (1..=max).contains(n))) {
                    Some(Some(n)) => Agg::LastN { n },
                    None => return Err(("n", "`last_n` needs an `n`, e.g. n = 10".to_string())),
                    Some(None) => {
                        return Err((
                            "n",
                            format!("must be from 1 to {max}, got {}", n.unwrap_or(0)),
                        ));
                    }
                }
            }
            a => a,
        })
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
            Agg::ApproxDistinct { .. } => 11,
            Agg::Quantile { .. } => 12,
            Agg::LastN { .. } => 13,
            Agg::TopK { .. } => 14,
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
            Agg::ApproxDistinct { .. } => "approx_distinct",
            Agg::Quantile { .. } => "quantile",
            Agg::LastN { .. } => "last_n",
            Agg::TopK { .. } => "top_k",
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
            Agg::Count
                | Agg::Min
                | Agg::Max
                | Agg::Last
                | Agg::First
                | Agg::ApproxDistinct { .. }
                | Agg::Quantile { .. }
                | Agg::LastN { .. }
        )
    }

    /// Whether the value is a list (`last_n`): `MergeOutput::lists` holds it, and the
    /// value is its length.
    pub fn is_list(self) -> bool {
        matches!(self, Agg::LastN { .. } | Agg::TopK { .. })
    }

    /// Whether the values are whole numbers, given as Int64 (`count`, `approx_distinct`).
    pub fn integer_valued(self) -> bool {
        matches!(self, Agg::Count | Agg::ApproxDistinct { .. })
    }

    /// Whether an empty window yields a value (0; an empty list) rather than null.
    pub fn zero_when_empty(self) -> bool {
        matches!(
            self,
            Agg::Count
                | Agg::Sum
                | Agg::DecayedSum { .. }
                | Agg::DecayedCount { .. }
                | Agg::ApproxDistinct { .. }
                | Agg::LastN { .. }
                | Agg::TopK { .. }
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
            Agg::ApproxDistinct { precision } => f.hll = Some(precision),
            Agg::Quantile {
                relative_accuracy, ..
            } => f.quantile = Some(relative_accuracy),
            Agg::LastN { n } => f.last_n = Some(n),
            Agg::TopK { capacity, .. } => f.top_k = Some(capacity),
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

    /// An aggregation with its default parameters (see [`Agg::with_params`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Agg::with_params(s, &AggParams::default()).map_err(|(_, e)| e)
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
    /// Precision of the HyperLogLog sketch kept for the column (its values are
    /// [`crate::hll::value`]s); a view gives each precision of a column its own column.
    pub hll: Option<u8>,
    /// Relative accuracy of the quantile sketch kept for the column (one per column,
    /// as for `hll`).
    pub quantile: Option<Param>,
    /// How many of the newest values are kept for the column (one per column, as for
    /// `hll`).
    pub last_n: Option<u16>,
    /// Capacity of the frequent-values summary kept for the column (one per column).
    pub top_k: Option<u16>,
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
            hll: self.hll.or(o.hll),
            quantile: self.quantile.or(o.quantile),
            last_n: self.last_n.or(o.last_n),
            top_k: self.top_k.or(o.top_k),
        }
    }

    /// Only the parameters (half-life, precision, accuracy): what tells apart the state
    /// columns of one value column.
    pub fn params(self) -> ColumnFields {
        ColumnFields {
            decay: self.decay,
            hll: self.hll,
            quantile: self.quantile,
            last_n: self.last_n,
            top_k: self.top_k,
            ..ColumnFields::default()
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
            + 3 * self.decay.is_some() as usize
            + self.hll.map_or(0, crate::hll::words)
            + self.quantile.map_or(0, |a| crate::quantile::words(a.get()))
            + self.last_n.map_or(0, crate::lastn::words)
            + self.top_k.map_or(0, crate::topk::words))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let parameterless = |a: &Agg| {
            !matches!(
                a.name(),
                "decayed_sum" | "decayed_count" | "quantile" | "last_n" | "top_k"
            )
        };
        for a in Agg::ALL.into_iter().filter(parameterless) {
            assert_eq!(a.name().parse::<Agg>().unwrap(), a);
        }
        let err = "median".parse::<Agg>().unwrap_err();
        assert!(err.contains("unknown aggregation \"median\""), "{err}");
        assert!(err.contains("count, sum, mean"), "{err}");
    }

    #[test]
    fn parameters_go_with_their_aggregations_only() {
        let params = |a: Agg| AggParams {
            half_life: a.half_life(),
            precision: match a {
                Agg::ApproxDistinct { precision } => Some(i64::from(precision)),
                _ => None,
            },
            q: match a {
                Agg::Quantile { q, .. } => Some(q.get()),
                _ => None,
            },
            n: match a {
                Agg::LastN { n } => Some(i64::from(n)),
                _ => None,
            },
            k: match a {
                Agg::TopK { k, .. } => Some(i64::from(k)),
                _ => None,
            },
            ..AggParams::default()
        };
        for (i, a) in Agg::ALL.into_iter().enumerate() {
            assert_eq!(a.code() as usize, i);
            assert_eq!(Agg::with_params(a.name(), &params(a)), Ok(a));
            let mut wrong = params(a);
            wrong.half_life = wrong.half_life.xor(Some(1));
            assert!(Agg::with_params(a.name(), &wrong).is_err(), "{a}");
        }
        let with = |name, half_life, precision| {
            Agg::with_params(
                name,
                &AggParams {
                    half_life,
                    precision,
                    ..AggParams::default()
                },
            )
        };
        let quantile = |q, relative_accuracy| {
            Agg::with_params(
                "quantile",
                &AggParams {
                    q,
                    relative_accuracy,
                    ..AggParams::default()
                },
            )
        };
        assert_eq!(
            quantile(Some(0.9), None),
            Ok(Agg::Quantile {
                q: Param::new(0.9),
                relative_accuracy: Param::new(0.01)
            })
        );
        for (q, a, field) in [
            (None, None, "q"),
            (Some(-0.1), None, "q"),
            (Some(1.5), None, "q"),
            (Some(f64::NAN), None, "q"),
            (Some(0.5), Some(0.0), "relative_accuracy"),
            (Some(0.5), Some(0.9), "relative_accuracy"),
        ] {
            assert_eq!(quantile(q, a).unwrap_err().0, field, "{q:?} {a:?}");
        }
        assert_eq!(
            with("decayed_sum", Some(5), None),
            Ok(Agg::DecayedSum { half_life: 5 })
        );
        let (field, err) = with("decayed_count", Some(0), None).unwrap_err();
        assert!(
            field == "half_life" && err.contains("must be positive"),
            "{err}"
        );
        let err = "decayed_sum".parse::<Agg>().unwrap_err();
        assert!(err.contains("needs a `half_life`"), "{err}");
        let (field, err) = with("mean", Some(1), None).unwrap_err();
        assert!(
            field == "half_life" && err.contains("not to `mean`"),
            "{err}"
        );
        assert_eq!(
            "approx_distinct".parse::<Agg>(),
            Ok(Agg::ApproxDistinct { precision: 12 })
        );
        assert_eq!(
            with("approx_distinct", None, Some(18)),
            Ok(Agg::ApproxDistinct { precision: 18 })
        );
        for p in [3, 19, -1, 1 << 40] {
            let (field, err) = with("approx_distinct", None, Some(p)).unwrap_err();
            assert!(
                field == "precision" && err.contains("from 4 to 18"),
                "{err}"
            );
        }
        let (field, _) = with("sum", None, Some(12)).unwrap_err();
        assert_eq!(field, "precision");
        let last_n = |n| {
            Agg::with_params(
                "last_n",
                &AggParams {
                    n,
                    ..AggParams::default()
                },
            )
        };
        assert_eq!(last_n(Some(1000)), Ok(Agg::LastN { n: 1000 }));
        for n in [None, Some(0), Some(1001), Some(-3)] {
            assert_eq!(last_n(n).unwrap_err().0, "n", "{n:?}");
        }
        let top_k = |k, capacity| {
            Agg::with_params(
                "top_k",
                &AggParams {
                    k,
                    capacity,
                    ..AggParams::default()
                },
            )
        };
        assert_eq!(top_k(Some(5), None), Ok(Agg::TopK { k: 5, capacity: 64 }));
        assert_eq!(
            top_k(Some(50), None),
            Ok(Agg::TopK {
                k: 50,
                capacity: 200
            })
        );
        for (k, c, field) in [
            (None, None, "k"),
            (Some(0), None, "k"),
            (Some(101), None, "k"),
            (Some(5), Some(4), "capacity"),
            (Some(5), Some(10_001), "capacity"),
        ] {
            assert_eq!(top_k(k, c).unwrap_err().0, field, "{k:?} {c:?}");
        }
    }
}
