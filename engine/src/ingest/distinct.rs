//! Values hashed for `approx_distinct`: each value of a column becomes its 64-bit hash,
//! carried as `panes_kernels::hll::value`.
//!
//! The hash is XXH64 with seed 0, of:
//! - integers of any width, signed or not, and floats that hold an integer: the value
//!   as a 16-byte little-endian two's-complement integer, so `7_i16`, `7_u64` and `7.0`
//!   are one value;
//! - other floats: the 8 little-endian bytes of the f64 (NaN is skipped, as every
//!   aggregation skips it);
//! - strings (and dictionaries of strings): their UTF-8 bytes; binary: its bytes.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, Float64Array};
use arrow_schema::DataType;
use panes_kernels::hll;
use twox_hash::XxHash64;

/// The hash of an integer value.
#[inline]
pub fn hash_int(v: i128) -> u64 {
    XxHash64::oneshot(0, &v.to_le_bytes())
}

/// The hash of a float value; `None` for NaN.
#[inline]
pub fn hash_float(v: f64) -> Option<u64> {
    if v.is_nan() {
        return None;
    }
    // Every float of magnitude below 2^63 with no fraction is an i64.
    if v.fract() == 0.0 && v.abs() < 2f64.powi(63) {
        return Some(hash_int(v as i64 as i128));
    }
    Some(XxHash64::oneshot(0, &v.to_le_bytes()))
}

/// The hash of a string or binary value.
#[inline]
pub fn hash_bytes(v: &[u8]) -> u64 {
    XxHash64::oneshot(0, v)
}

/// The hash of every value of `array` (`panes_kernels::hll::value`), as a Float64 array
/// with the same nulls (NaN for a NaN value).
///
/// # Errors
/// A message naming the type when the column holds neither numbers nor strings.
pub(crate) fn hashes(array: &dyn Array) -> Result<ArrayRef, String> {
    let nulls = array.nulls().cloned();
    let ints = |values: Vec<i128>| {
        values
            .into_iter()
            .map(|v| hll::value(hash_int(v)))
            .collect()
    };
    let values: Vec<f64> = match array.data_type() {
        DataType::Int8 => ints(prim::<Int8Type>(array)),
        DataType::Int16 => ints(prim::<Int16Type>(array)),
        DataType::Int32 => ints(prim::<Int32Type>(array)),
        DataType::Int64 => ints(prim::<Int64Type>(array)),
        DataType::UInt8 => ints(prim::<UInt8Type>(array)),
        DataType::UInt16 => ints(prim::<UInt16Type>(array)),
        DataType::UInt32 => ints(prim::<UInt32Type>(array)),
        DataType::UInt64 => ints(prim::<UInt64Type>(array)),
        DataType::Utf8 => strings(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(array.as_string::<i64>().iter()),
        DataType::Utf8View => strings(array.as_string_view().iter()),
        DataType::Binary => bytes(array.as_binary::<i32>().iter()),
        DataType::LargeBinary => bytes(array.as_binary::<i64>().iter()),
        DataType::BinaryView => bytes(array.as_binary_view().iter()),
        DataType::Dictionary(_, v)
            if matches!(
                **v,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            let s = arrow_cast::cast(array, &DataType::Utf8).map_err(|e| e.to_string())?;
            return hashes(s.as_ref());
        }
        t if t.is_numeric() => {
            let f = arrow_cast::cast(array, &DataType::Float64).map_err(|e| e.to_string())?;
            let f = f.as_primitive::<Float64Type>();
            let values = f
                .values()
                .iter()
                .map(|&v| hash_float(v).map_or(f64::NAN, hll::value))
                .collect();
            return Ok(Arc::new(Float64Array::new(values, f.nulls().cloned())));
        }
        t => {
            return Err(format!(
                "column has type {t}; approx_distinct takes integers, floats, decimals or strings"
            ));
        }
    };
    Ok(Arc::new(Float64Array::new(values.into(), nulls)))
}

/// The values of an integer array, widened (nulls read as their slot's value).
fn prim<T: ArrowPrimitiveType>(array: &dyn Array) -> Vec<i128>
where
    T::Native: Into<i128>,
{
    let a = array.as_primitive::<T>();
    a.values().iter().map(|&v| v.into()).collect()
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Vec<f64> {
    values
        .map(|v| v.map_or(f64::NAN, |s| hll::value(hash_bytes(s.as_bytes()))))
        .collect()
}

fn bytes<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<f64> {
    values
        .map(|v| v.map_or(f64::NAN, |b| hll::value(hash_bytes(b))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int16Array, Int64Array, StringArray, UInt64Array};

    #[test]
    fn integers_hash_by_value_across_widths_and_floats() {
        let of = |a: ArrayRef| {
            let c = hashes(a.as_ref()).unwrap();
            let c = c.as_primitive::<Float64Type>();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_bits()))
                .collect::<Vec<_>>()
        };
        let i16s = of(Arc::new(Int16Array::from(vec![Some(-3), None, Some(7)])));
        let i64s = of(Arc::new(Int64Array::from(vec![Some(-3), None, Some(7)])));
        let f64s = of(Arc::new(Float64Array::from(vec![
            Some(-3.0),
            None,
            Some(7.0),
        ])));
        assert_eq!(i16s, i64s);
        assert_eq!(i16s, f64s);
        assert_eq!(i16s[1], None, "nulls stay null");
        // Beyond i64, unsigned values keep their own value.
        let big = of(Arc::new(UInt64Array::from(vec![u64::MAX])));
        let minus_one = of(Arc::new(Int64Array::from(vec![-1])));
        assert_ne!(big, minus_one);
        // −0.0 is 0; NaN is skipped; a fraction hashes its bits.
        assert_eq!(hash_float(-0.0), Some(hash_int(0)));
        assert_eq!(hash_float(f64::NAN), None);
        assert_ne!(hash_float(0.5), hash_float(1.5));
    }

    #[test]
    fn strings_hash_their_bytes_whatever_the_layout() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("bc")]));
        let dict = arrow_cast::cast(
            &s,
            &DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
        )
        .unwrap();
        let view = arrow_cast::cast(&s, &DataType::Utf8View).unwrap();
        let bits = |a: &ArrayRef| {
            let c = hashes(a.as_ref()).unwrap();
            let c = c.as_primitive::<Float64Type>().clone();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&s), bits(&dict));
        assert_eq!(bits(&s), bits(&view));
        assert_eq!(bits(&s)[0], Some(hll::value(hash_bytes(b"a")).to_bits()));
        let err = hashes(&arrow_array::BooleanArray::from(vec![true])).unwrap_err();
        assert!(err.contains("type Boolean"), "{err}");
    }
}
