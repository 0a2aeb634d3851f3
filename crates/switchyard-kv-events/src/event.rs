//! The event batch, as vLLM and SGLang encode it.
//!
//! Both engines define it with msgspec structs encoded as arrays (`array_like`): a batch is
//! `[ts, [event, ...]]` with an optional trailing data-parallel rank, and each event is an
//! array whose first element is its tag:
//!
//! - `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`
//! - `["BlockRemoved", block_hashes, medium]`
//! - `["AllBlocksCleared"]`
//!
//! Trailing fields a newer engine adds are ignored, trailing fields an older one omits take
//! their defaults. Block hashes are integers (SGLang, older vLLM) or bytes (vLLM's SHA-256);
//! either way they are only compared with each other, so they are kept as a 64-bit digest.

use crate::msgpack::{self, Value, Writer};

/// An engine's block hash, as a 64-bit digest of what the engine sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

impl BlockHash {
    fn from_value(v: &Value) -> Result<Self, EventError> {
        match v {
            Value::Int(i) => Ok(Self(*i as u64)),
            Value::UInt(u) => Ok(Self(*u)),
            // FNV-1a over the bytes: SHA-256 digests are uniform already, any fold would do.
            Value::Bin(b) => Ok(Self(
                b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3)),
            )),
            other => Err(EventError::Field("block hash", kind(other))),
        }
    }
}

/// One change to an engine's prefix cache.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks were stored: consecutive blocks of one sequence, each `block_size` tokens.
    BlockStored {
        /// The engine's hashes of the stored blocks, in order.
        block_hashes: Vec<BlockHash>,
        /// The engine's hash of the block before the first (`None`: the sequence's start).
        parent_block_hash: Option<BlockHash>,
        /// The tokens of every stored block, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// LoRA adapter the blocks belong to, if any.
        lora_id: Option<i64>,
        /// Where the blocks live (`"GPU"`, `"CPU"`, ...), if said.
        medium: Option<String>,
    },
    /// Blocks were evicted.
    BlockRemoved {
        /// The engine's hashes of the removed blocks.
        block_hashes: Vec<BlockHash>,
        /// Where they were, if said.
        medium: Option<String>,
    },
    /// The whole cache was dropped.
    AllBlocksCleared,
}

/// One published message's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Engine timestamp, seconds.
    pub ts: f64,
    /// The events, in the order they happened.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that published it, when the engine runs several.
    pub data_parallel_rank: Option<i64>,
}

/// Why a payload is not an event batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Not msgpack.
    #[error(transparent)]
    Msgpack(#[from] msgpack::DecodeError),
    /// A field of the wrong type.
    #[error("kv event: {0} is {1}")]
    Field(&'static str, &'static str),
    /// An event tag this crate does not know.
    #[error("kv event: unknown event {0:?}")]
    UnknownEvent(String),
    /// A stored event whose tokens do not fill its blocks.
    #[error("kv event: BlockStored has {tokens} tokens for {blocks} blocks of {block_size}")]
    TokenCount {
        /// Tokens sent.
        tokens: usize,
        /// Blocks sent.
        blocks: usize,
        /// Tokens per block.
        block_size: u32,
    },
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Bool(_) => "a boolean",
        Value::Int(_) | Value::UInt(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bin(_) => "bytes",
        Value::Array(_) | Value::Ints(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension",
    }
}

fn field(fields: &[Value], i: usize) -> &Value {
    fields.get(i).unwrap_or(&Value::Nil)
}

fn array<'a>(v: &'a Value, name: &'static str) -> Result<&'a [Value], EventError> {
    v.as_array().ok_or(EventError::Field(name, kind(v)))
}

fn opt_int(v: &Value, name: &'static str) -> Result<Option<i64>, EventError> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        other => Err(EventError::Field(name, kind(other))),
    }
}

fn opt_str(v: &Value, name: &'static str) -> Result<Option<String>, EventError> {
    match v {
        Value::Nil => Ok(None),
        Value::Str(s) => Ok(Some(s.clone())),
        other => Err(EventError::Field(name, kind(other))),
    }
}

fn hashes(v: &Value) -> Result<Vec<BlockHash>, EventError> {
    match v.as_ints() {
        Some(ints) => Ok(ints.iter().map(|h| BlockHash(*h as u64)).collect()),
        None => array(v, "block_hashes")?.iter().map(BlockHash::from_value).collect(),
    }
}

impl KvEvent {
    fn from_value(v: &Value) -> Result<Self, EventError> {
        let fields = array(v, "event")?;
        let tag = field(fields, 0).as_str().ok_or(EventError::Field("event tag", kind(field(fields, 0))))?;
        match tag {
            "BlockStored" => {
                let block_hashes = hashes(field(fields, 1))?;
                let parent_block_hash = match field(fields, 2) {
                    Value::Nil => None,
                    h => Some(BlockHash::from_value(h)?),
                };
                let ids = field(fields, 3);
                let token_ids = ids
                    .as_ints()
                    .ok_or(EventError::Field("token_ids", kind(ids)))?
                    .iter()
                    .map(|t| u32::try_from(*t).map_err(|_| EventError::Field("token id", "out of range")))
                    .collect::<Result<Vec<u32>, _>>()?;
                let block_size = match field(fields, 4) {
                    Value::Int(n) if *n > 0 && *n <= i64::from(u32::MAX) => *n as u32,
                    other => return Err(EventError::Field("block_size", kind(other))),
                };
                if token_ids.len() != block_hashes.len() * block_size as usize {
                    return Err(EventError::TokenCount {
                        tokens: token_ids.len(),
                        blocks: block_hashes.len(),
                        block_size,
                    });
                }
                Ok(KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id: opt_int(field(fields, 5), "lora_id")?,
                    medium: opt_str(field(fields, 6), "medium")?,
                })
            }
            "BlockRemoved" => Ok(KvEvent::BlockRemoved {
                block_hashes: hashes(field(fields, 1))?,
                medium: opt_str(field(fields, 2), "medium")?,
            }),
            "AllBlocksCleared" => Ok(KvEvent::AllBlocksCleared),
            other => Err(EventError::UnknownEvent(other.chars().take(64).collect())),
        }
    }

    fn encode(&self, w: &mut Writer) {
        let opt_str = |w: &mut Writer, s: &Option<String>| match s {
            Some(s) => w.str(s),
            None => w.nil(),
        };
        match self {
            KvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium } => {
                w.array(7);
                w.str("BlockStored");
                w.array(block_hashes.len());
                for h in block_hashes {
                    w.int(h.0 as i64);
                }
                match parent_block_hash {
                    Some(h) => w.int(h.0 as i64),
                    None => w.nil(),
                }
                w.array(token_ids.len());
                for t in token_ids {
                    w.int(i64::from(*t));
                }
                w.int(i64::from(*block_size));
                match lora_id {
                    Some(l) => w.int(*l),
                    None => w.nil(),
                }
                opt_str(w, medium);
            }
            KvEvent::BlockRemoved { block_hashes, medium } => {
                w.array(3);
                w.str("BlockRemoved");
                w.array(block_hashes.len());
                for h in block_hashes {
                    w.int(h.0 as i64);
                }
                opt_str(w, medium);
            }
            KvEvent::AllBlocksCleared => {
                w.array(1);
                w.str("AllBlocksCleared");
            }
        }
    }
}

impl EventBatch {
    /// Decodes a published payload.
    pub fn decode(payload: &[u8]) -> Result<Self, EventError> {
        let v = msgpack::decode(payload)?;
        let fields = array(&v, "batch")?;
        let ts = match field(fields, 0) {
            Value::Float(f) => *f,
            Value::Int(i) => *i as f64,
            other => return Err(EventError::Field("ts", kind(other))),
        };
        let events = array(field(fields, 1), "events")?.iter().map(KvEvent::from_value).collect::<Result<_, _>>()?;
        Ok(Self { ts, events, data_parallel_rank: opt_int(field(fields, 2), "data_parallel_rank")? })
    }

    /// Encodes the batch as the engines do (integer block hashes; the rank omitted when unset).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.array(if self.data_parallel_rank.is_some() { 3 } else { 2 });
        w.float(self.ts);
        w.array(self.events.len());
        for e in &self.events {
            e.encode(&mut w);
        }
        if let Some(r) = self.data_parallel_rank {
            w.int(r);
        }
        w.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch built byte by byte as msgspec encodes vLLM's `KVEventBatch` (array_like, tagged
    /// events, omit_defaults: no rank).
    #[test]
    fn decodes_a_hand_built_vllm_batch() {
        let mut b = vec![0x92, 0xcb];
        b.extend_from_slice(&1.25f64.to_bits().to_be_bytes());
        b.push(0x93); // three events
                      // ["BlockStored", [7, -2], null, [1,2,3,4], 2, null, "GPU"]
        b.extend_from_slice(&[0x97, 0xab]);
        b.extend_from_slice(b"BlockStored");
        b.extend_from_slice(&[0x92, 0x07, 0xfe, 0xc0, 0x94, 1, 2, 3, 4, 0x02, 0xc0, 0xa3]);
        b.extend_from_slice(b"GPU");
        // ["BlockRemoved", [bin(32 bytes)], null]
        b.extend_from_slice(&[0x93, 0xac]);
        b.extend_from_slice(b"BlockRemoved");
        b.extend_from_slice(&[0x91, 0xc4, 32]);
        b.extend_from_slice(&[0xab; 32]);
        b.push(0xc0);
        // ["AllBlocksCleared"]
        b.extend_from_slice(&[0x91, 0xb0]);
        b.extend_from_slice(b"AllBlocksCleared");
        let batch = EventBatch::decode(&b).unwrap();
        assert_eq!(batch.ts, 1.25);
        assert_eq!(batch.data_parallel_rank, None);
        assert_eq!(
            batch.events[0],
            KvEvent::BlockStored {
                block_hashes: vec![BlockHash(7), BlockHash(-2i64 as u64)],
                parent_block_hash: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: 2,
                lora_id: None,
                medium: Some("GPU".into()),
            }
        );
        assert!(
            matches!(&batch.events[1], KvEvent::BlockRemoved { block_hashes, medium: None } if block_hashes.len() == 1)
        );
        assert_eq!(batch.events[2], KvEvent::AllBlocksCleared);
    }

    #[test]
    fn encode_decode_round_trip_with_rank() {
        let batch = EventBatch {
            ts: 3.0,
            events: vec![
                KvEvent::BlockStored {
                    block_hashes: vec![BlockHash(1), BlockHash(u64::MAX)],
                    parent_block_hash: Some(BlockHash(99)),
                    token_ids: (0..32).collect(),
                    block_size: 16,
                    lora_id: Some(3),
                    medium: None,
                },
                KvEvent::BlockRemoved { block_hashes: vec![BlockHash(1)], medium: Some("GPU".into()) },
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(2),
        };
        assert_eq!(EventBatch::decode(&batch.encode()).unwrap(), batch);
    }

    #[test]
    fn malformed_events_are_named() {
        let stored = |tokens: usize| EventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: vec![BlockHash(1)],
                parent_block_hash: None,
                token_ids: (0..tokens as u32).collect(),
                block_size: 4,
                lora_id: None,
                medium: None,
            }],
            data_parallel_rank: None,
        };
        let mut bytes = stored(4).encode();
        assert!(EventBatch::decode(&bytes).is_ok());
        // Same batch with 3 tokens for one block of 4.
        bytes = stored(3).encode();
        assert_eq!(EventBatch::decode(&bytes), Err(EventError::TokenCount { tokens: 3, blocks: 1, block_size: 4 }));
        let mut w = Writer::default();
        w.array(2);
        w.float(0.0);
        w.array(1);
        w.array(1);
        w.str("BlockMoved");
        assert_eq!(EventBatch::decode(&w.0), Err(EventError::UnknownEvent("BlockMoved".into())));
    }
}
