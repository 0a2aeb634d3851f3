//! The subset of msgpack that event batches use, decoded into a [`Value`] tree.
//!
//! Decoding is bounded by its input: a length is trusted only when the bytes left could hold
//! that many elements (each takes at least one byte), so a hostile length cannot make the
//! decoder allocate more than the frame it was given; nesting is limited to [`MAX_DEPTH`].

/// Deepest nesting accepted (a batch is three levels deep).
pub const MAX_DEPTH: usize = 16;

/// A decoded msgpack value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `nil`.
    Nil,
    /// `true` / `false`.
    Bool(bool),
    /// Any integer that fits an `i64`.
    Int(i64),
    /// A positive integer above `i64::MAX`.
    UInt(u64),
    /// `float 32` or `float 64`.
    Float(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes.
    Bin(Vec<u8>),
    /// An array.
    Array(Vec<Value>),
    /// An array whose elements are all integers that fit an `i64` (token ids, block hashes):
    /// kept at 8 bytes an element rather than a [`Value`]'s 32, which bounds what a large batch
    /// costs to decode.
    Ints(Vec<i64>),
    /// A map, in wire order.
    Map(Vec<(Value, Value)>),
    /// An extension type (kept, not interpreted).
    Ext(i8, Vec<u8>),
}

/// Why bytes are not a msgpack value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("msgpack: truncated input")]
    Truncated,
    /// A byte that starts no msgpack type (0xc1).
    #[error("msgpack: invalid type byte {0:#04x}")]
    InvalidType(u8),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("msgpack: nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A string that is not UTF-8.
    #[error("msgpack: string is not UTF-8")]
    NotUtf8,
    /// Bytes left over after the value.
    #[error("msgpack: {0} trailing bytes")]
    Trailing(usize),
}

impl Value {
    /// The value as an `i64`, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The value as an array (`None` for an all-integer array: see [`Value::as_ints`]).
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as an array of integers (an empty array counts).
    pub fn as_ints(&self) -> Option<&[i64]> {
        match self {
            Value::Ints(a) => Some(a),
            Value::Array(a) if a.is_empty() => Some(&[]),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Decodes exactly one value from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let v = r.value(0)?;
    match bytes.len() - r.pos {
        0 => Ok(v),
        n => Err(DecodeError::Trailing(n)),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or(DecodeError::Truncated)?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// A count of elements, each at least `min_bytes` long, checked against what is left.
    fn count(&mut self, n: usize, min_bytes: usize) -> Result<usize, DecodeError> {
        let c = self.uint(n)? as usize;
        if c.saturating_mul(min_bytes) > self.bytes.len() - self.pos {
            return Err(DecodeError::Truncated);
        }
        Ok(c)
    }

    fn str(&mut self, len: usize) -> Result<Value, DecodeError> {
        let b = self.take(len)?;
        std::str::from_utf8(b).map(|s| Value::Str(s.to_owned())).map_err(|_| DecodeError::NotUtf8)
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Value, DecodeError> {
        let mut ints = Vec::with_capacity(len);
        for i in 0..len {
            match self.value(depth + 1)? {
                Value::Int(n) => ints.push(n),
                other => {
                    // Not all integers: the general form from here on.
                    let mut items: Vec<Value> = Vec::with_capacity(len);
                    items.extend(ints.into_iter().map(Value::Int));
                    items.push(other);
                    for _ in i + 1..len {
                        items.push(self.value(depth + 1)?);
                    }
                    return Ok(Value::Array(items));
                }
            }
        }
        Ok(if len == 0 { Value::Array(Vec::new()) } else { Value::Ints(ints) })
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Value, DecodeError> {
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push((self.value(depth + 1)?, self.value(depth + 1)?));
        }
        Ok(Value::Map(items))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let t = self.take(1)?[0];
        Ok(match t {
            0x00..=0x7f => Value::Int(i64::from(t)),
            0x80..=0x8f => return self.map(usize::from(t & 0x0f), depth),
            0x90..=0x9f => return self.array(usize::from(t & 0x0f), depth),
            0xa0..=0xbf => return self.str(usize::from(t & 0x1f)),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.uint(1 << (t - 0xc4))? as usize;
                Value::Bin(self.take(n)?.to_vec())
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (t - 0xc7))? as usize;
                let kind = self.take(1)?[0] as i8;
                Value::Ext(kind, self.take(n)?.to_vec())
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.uint(8)?)),
            0xcc..=0xcf => {
                let u = self.uint(1 << (t - 0xcc))?;
                i64::try_from(u).map_or(Value::UInt(u), Value::Int)
            }
            0xd0..=0xd3 => {
                let n = 1usize << (t - 0xd0);
                let u = self.uint(n)?;
                // Sign-extend from n bytes.
                let shift = 64 - 8 * n as u32;
                Value::Int(((u << shift) as i64) >> shift)
            }
            0xd4..=0xd8 => {
                let n = 1usize << (t - 0xd4);
                let kind = self.take(1)?[0] as i8;
                Value::Ext(kind, self.take(n)?.to_vec())
            }
            0xd9..=0xdb => {
                let n = self.uint(1 << (t - 0xd9))? as usize;
                return self.str(n);
            }
            0xdc | 0xdd => {
                let n = self.count(if t == 0xdc { 2 } else { 4 }, 1)?;
                return self.array(n, depth);
            }
            0xde | 0xdf => {
                let n = self.count(if t == 0xde { 2 } else { 4 }, 2)?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::Int(i64::from(t as i8)),
            0xc1 => return Err(DecodeError::InvalidType(t)),
        })
    }
}

/// Appends msgpack encodings to a buffer.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// `nil`.
    pub fn nil(&mut self) {
        self.0.push(0xc0);
    }

    /// An integer, in its shortest form.
    pub fn int(&mut self, v: i64) {
        if (0..=0x7f).contains(&v) {
            self.0.push(v as u8);
        } else if (-32..0).contains(&v) {
            self.0.push(v as i8 as u8);
        } else if (0..=0xff).contains(&v) {
            self.0.extend_from_slice(&[0xcc, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.0.push(0xcd);
            self.0.extend_from_slice(&(v as u16).to_be_bytes());
        } else if (0..=0xffff_ffff).contains(&v) {
            self.0.push(0xce);
            self.0.extend_from_slice(&(v as u32).to_be_bytes());
        } else if v >= 0 {
            self.0.push(0xcf);
            self.0.extend_from_slice(&(v as u64).to_be_bytes());
        } else {
            self.0.push(0xd3);
            self.0.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// A `float 64`.
    pub fn float(&mut self, v: f64) {
        self.0.push(0xcb);
        self.0.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    /// A string.
    pub fn str(&mut self, s: &str) {
        let n = s.len();
        if n < 32 {
            self.0.push(0xa0 | n as u8);
        } else if n <= 0xff {
            self.0.extend_from_slice(&[0xd9, n as u8]);
        } else if n <= 0xffff {
            self.0.push(0xda);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(0xdb);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.0.extend_from_slice(s.as_bytes());
    }

    /// Raw bytes.
    pub fn bin(&mut self, b: &[u8]) {
        let n = b.len();
        if n <= 0xff {
            self.0.extend_from_slice(&[0xc4, n as u8]);
        } else if n <= 0xffff {
            self.0.push(0xc5);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(0xc6);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.0.extend_from_slice(b);
    }

    /// The header of an array of `n` elements (the elements follow).
    pub fn array(&mut self, n: usize) {
        if n < 16 {
            self.0.push(0x90 | n as u8);
        } else if n <= 0xffff {
            self.0.push(0xdc);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(0xdd);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_in_every_width() {
        for v in [0, 1, 127, 128, 255, 256, 65_535, 65_536, 1 << 40, i64::MAX, -1, -32, -33, -200, -70_000, i64::MIN] {
            let mut w = Writer::default();
            w.int(v);
            assert_eq!(decode(&w.0), Ok(Value::Int(v)), "{v}");
        }
        assert_eq!(decode(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), Ok(Value::UInt(u64::MAX)));
        assert_eq!(decode(&[0xd0, 0x80]), Ok(Value::Int(-128)));
        assert_eq!(decode(&[0xd1, 0xff, 0x00]), Ok(Value::Int(-256)));
    }

    #[test]
    fn nested_values_round_trip() {
        let mut w = Writer::default();
        w.array(4);
        w.float(1.5);
        w.str("BlockStored");
        w.bin(&[1, 2, 3]);
        w.array(20);
        for i in 0..20 {
            w.int(i);
        }
        let v = decode(&w.0).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a[0], Value::Float(1.5));
        assert_eq!(a[1].as_str(), Some("BlockStored"));
        assert_eq!(a[2], Value::Bin(vec![1, 2, 3]));
        assert_eq!(a[3].as_ints().unwrap(), (0..20).collect::<Vec<i64>>().as_slice(), "integers kept compact");
        // Integers then something else: the general form, in order.
        assert_eq!(decode(&[0x93, 0x01, 0x02, 0xc0]), Ok(Value::Array(vec![Value::Int(1), Value::Int(2), Value::Nil])));
    }

    #[test]
    fn hostile_lengths_and_depths_are_errors_not_allocations() {
        // An array32 claiming 4 billion elements in a 5-byte frame.
        assert_eq!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x91; 100]), Err(DecodeError::TooDeep));
        assert_eq!(decode(&[0xc1]), Err(DecodeError::InvalidType(0xc1)));
        assert_eq!(decode(&[0x01, 0x02]), Err(DecodeError::Trailing(1)));
        assert_eq!(decode(&[0xa2, 0xff, 0xfe]), Err(DecodeError::NotUtf8));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    }
}
