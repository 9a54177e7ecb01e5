//! Decoding of the `pgoutput` messages (protocol version 1, text values) that carry row
//! changes: Relation, Insert, Update, Delete, Truncate. Begin, Commit and logical messages are
//! cut out of the stream by `pgwire-replication` already. Pure: bytes in, typed messages out;
//! a malformed message is an error, never a panic (the stream is network input).
//!
//! Format: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.

use bytes::{Buf, Bytes};

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended inside a field.
    #[error("pgoutput message {0:?} is truncated")]
    Truncated(char),
    /// A column value of an unknown kind.
    #[error("pgoutput tuple column of unknown kind {0:?}")]
    ColumnKind(char),
    /// A tuple marker other than the ones the message allows.
    #[error("pgoutput {message:?} message has an unexpected tuple marker {marker:?}")]
    Marker {
        /// The message's tag.
        message: char,
        /// The marker found.
        marker: char,
    },
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change (not sent; take it from the old row).
    Unchanged,
    /// The value's text output.
    Text(Bytes),
}

/// A row as the stream carries it: one value per column of its relation.
pub type Tuple = Vec<Value>;

/// A table's shape, sent before its first change in a session and after each DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub id: u32,
    /// Its schema.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its column names, in tuple order.
    pub columns: Vec<String>,
}

/// The messages rowcast acts on; everything else is [`Message::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A table's shape.
    Relation(Relation),
    /// A new row.
    Insert {
        /// The table.
        relation: u32,
        /// The row.
        new: Tuple,
    },
    /// A changed row; `old` is present under REPLICA IDENTITY FULL (or a key change).
    Update {
        /// The table.
        relation: u32,
        /// The row before, when sent.
        old: Option<Tuple>,
        /// The row after.
        new: Tuple,
    },
    /// A deleted row (the whole old row under REPLICA IDENTITY FULL, else its key).
    Delete {
        /// The table.
        relation: u32,
        /// The row (or key) before.
        old: Tuple,
    },
    /// TRUNCATE of these tables: the rows are not in the stream.
    Truncate {
        /// The tables.
        relations: Vec<u32>,
    },
    /// Type, Origin and anything newer.
    Other,
}

/// Decodes one pgoutput message.
pub fn decode(mut data: Bytes) -> Result<Message, DecodeError> {
    if data.is_empty() {
        return Ok(Message::Other);
    }
    let tag = data.get_u8();
    let t = char::from(tag);
    let mut r = Reader { data, tag: t };
    match tag {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let _replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let _flags = r.u8()?;
                columns.push(r.string()?);
                let _type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
            }
            Ok(Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32()?;
            r.expect_marker(b"N")?;
            Ok(Message::Insert {
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation = r.u32()?;
            let marker = r.expect_marker(b"KON")?;
            let old = if marker == b'N' {
                None
            } else {
                let old = r.tuple()?;
                r.expect_marker(b"N")?;
                Some(old)
            };
            Ok(Message::Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32()?;
            r.expect_marker(b"KO")?;
            Ok(Message::Delete {
                relation,
                old: r.tuple()?,
            })
        }
        b'T' => {
            let count = r.u32()?;
            let _options = r.u8()?;
            // Each id is 4 bytes: a count the message cannot hold is refused before allocating.
            if r.data.remaining() / 4 < usize::try_from(count).unwrap_or(usize::MAX) {
                return Err(DecodeError::Truncated(t));
            }
            let relations = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Ok(Message::Truncate { relations })
        }
        _ => Ok(Message::Other),
    }
}

struct Reader {
    data: Bytes,
    tag: char,
}

impl Reader {
    fn need(&self, bytes: usize) -> Result<(), DecodeError> {
        if self.data.remaining() < bytes {
            Err(DecodeError::Truncated(self.tag))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.data.get_u8())
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.data.get_u16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.data.get_u32())
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(self.tag))?;
        let text = String::from_utf8_lossy(&self.data[..end]).into_owned();
        self.data.advance(end + 1);
        Ok(text)
    }

    fn expect_marker(&mut self, allowed: &[u8]) -> Result<u8, DecodeError> {
        let marker = self.u8()?;
        if allowed.contains(&marker) {
            Ok(marker)
        } else {
            Err(DecodeError::Marker {
                message: self.tag,
                marker: char::from(marker),
            })
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let kind = self.u8()?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
                    self.need(len)?;
                    Value::Text(self.data.split_to(len))
                }
                other => return Err(DecodeError::ColumnKind(char::from(other))),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(u16::try_from(values.len()).unwrap());
        for value in values {
            match value {
                None => out.put_u8(b'n'),
                Some(text) => {
                    out.put_u8(b't');
                    out.put_u32(u32::try_from(text.len()).unwrap());
                    out.put_slice(text.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn relations_name_their_columns() {
        let mut msg = vec![b'R'];
        msg.put_u32(16384);
        msg.put_slice(b"public\0products\0");
        msg.put_u8(b'f');
        msg.put_u16(2);
        for name in ["product_id", "manufacturer"] {
            msg.put_u8(1);
            msg.put_slice(name.as_bytes());
            msg.put_u8(0);
            msg.put_u32(20);
            msg.put_u32(u32::MAX);
        }
        let Message::Relation(relation) = decode(Bytes::from(msg)).unwrap() else {
            panic!("a relation");
        };
        assert_eq!(relation.id, 16384);
        assert_eq!(relation.name, "products");
        assert_eq!(relation.columns, ["product_id", "manufacturer"]);
    }

    #[test]
    fn updates_carry_the_old_row_under_full_identity() {
        let mut msg = vec![b'U'];
        msg.put_u32(7);
        msg.put_u8(b'O');
        msg.extend(tuple(&[Some("1"), Some("old")]));
        msg.put_u8(b'N');
        msg.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(Bytes::from(msg)).unwrap(),
            Message::Update {
                relation: 7,
                old: Some(vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Text(Bytes::from_static(b"old"))
                ]),
                new: vec![Value::Text(Bytes::from_static(b"1")), Value::Null],
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut msg = vec![b'I'];
        msg.put_u32(7);
        msg.put_u8(b'N');
        msg.put_u16(1);
        msg.put_u8(b't');
        msg.put_u32(1000);
        msg.put_slice(b"short");
        assert_eq!(decode(Bytes::from(msg)), Err(DecodeError::Truncated('I')));
        assert_eq!(
            decode(Bytes::from_static(b"T\xff\xff\xff\xff\x00")),
            Err(DecodeError::Truncated('T'))
        );
        assert!(matches!(
            decode(Bytes::from_static(b"D\0\0\0\x07X")),
            Err(DecodeError::Marker { .. })
        ));
        assert_eq!(decode(Bytes::from_static(b"Y")), Ok(Message::Other));
    }
}
