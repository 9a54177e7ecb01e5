//! Events of the stream → batches of changelog rows: which transactions are the trigger's
//! (before the switch's marker) or already written (at or before `applied_lsn`), products rows
//! out of pgoutput tuples, key changes as DELETE + INSERT, TRUNCATE as a gap, and which
//! position may be confirmed to the server. Pure: fed events, it only changes itself, so every
//! rule is unit-tested without a server.

use std::collections::HashMap;

use pgwire_replication::ReplicationEvent;

use super::ReaderError;
use super::pgoutput::{self, Message, Tuple, Value};
use crate::db::replication::{
    BATCH_BYTES, BATCH_ROWS, Batch, MARKER_CONTENT, MARKER_PREFIX, RowChange,
};

/// The products columns' positions in a relation's tuples.
#[derive(Debug, Clone, Copy)]
struct Columns {
    product_id: usize,
    manufacturer: usize,
    price_per_unit: usize,
    units_available: usize,
    product_name: usize,
}

impl Columns {
    fn of(relation: &pgoutput::Relation) -> Option<Self> {
        let at = |name: &str| relation.columns.iter().position(|c| c == name);
        Some(Self {
            product_id: at("product_id")?,
            manufacturer: at("manufacturer")?,
            price_per_unit: at("price_per_unit")?,
            units_available: at("units_available")?,
            product_name: at("product_name")?,
        })
    }
}

/// The transaction being decoded.
#[derive(Debug, Default)]
struct Transaction {
    open: bool,
    changes: Vec<RowChange>,
    marker: bool,
    truncate: bool,
}

/// Turns events into batches.
#[derive(Debug)]
pub(super) struct Decoder {
    /// Relation id → the products columns (None: not `products`).
    relations: HashMap<u32, Option<Columns>>,
    tx: Transaction,
    /// Committed transactions not yet written.
    pub(super) batch: Batch,
    /// Text bytes of the batch's changes.
    batch_bytes: usize,
    /// The batch must be written even without changes (armed changed).
    dirty: bool,
    /// Transactions ending at or before this are in the changelog already.
    applied: Option<u64>,
    /// A position to confirm to the server.
    pub(super) confirm: Option<u64>,
}

impl Decoder {
    pub(super) fn new(armed: bool, applied: Option<u64>) -> Self {
        Self {
            relations: HashMap::new(),
            tx: Transaction::default(),
            batch: Batch {
                armed,
                ..Batch::default()
            },
            batch_bytes: 0,
            dirty: false,
            applied,
            confirm: None,
        }
    }

    pub(super) fn batch_full(&self) -> bool {
        self.batch.changes.len() >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES
    }

    pub(super) fn ready_to_write(&self) -> bool {
        !self.tx.open && (self.dirty || self.batch.gap || !self.batch.changes.is_empty())
    }

    pub(super) fn written(&mut self) {
        self.applied = Some(self.batch.lsn);
        self.confirm = Some(self.batch.lsn);
        self.batch.changes.clear();
        self.batch_bytes = 0;
        self.batch.gap = false;
        self.dirty = false;
    }

    pub(super) fn handle(&mut self, event: ReplicationEvent) -> Result<(), ReaderError> {
        match event {
            ReplicationEvent::Begin { .. } => {
                self.tx = Transaction {
                    open: true,
                    ..Transaction::default()
                };
            }
            ReplicationEvent::XLogData { data, .. } => self.change(pgoutput::decode(data)?)?,
            ReplicationEvent::Message {
                prefix, content, ..
            } => {
                if prefix == MARKER_PREFIX && content.as_ref() == MARKER_CONTENT {
                    self.tx.marker = true;
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => self.commit(end_lsn.as_u64(), commit_time_micros),
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything sent before this position has been handled; with nothing pending,
                // confirming it lets the server drop WAL of other tables' writes.
                if !self.tx.open && !self.ready_to_write() {
                    self.confirm = Some(wal_end.as_u64());
                }
            }
            ReplicationEvent::StoppedAt { .. } => return Err(ReaderError::StreamEnded),
        }
        Ok(())
    }

    fn commit(&mut self, end: u64, commit_time_micros: i64) {
        let mut tx = std::mem::take(&mut self.tx);
        if self.applied.is_some_and(|applied| end <= applied) {
            return;
        }
        if self.batch.armed {
            for change in &mut tx.changes {
                change.committed_at_micros = commit_time_micros;
                self.batch_bytes += change.text_bytes();
            }
            self.batch.changes.append(&mut tx.changes);
            self.batch.gap |= tx.truncate;
        } else if tx.marker {
            // Everything before was recorded by the trigger; everything after is ours.
            self.batch.armed = true;
            self.dirty = true;
        }
        self.batch.lsn = end;
        if !self.ready_to_write() {
            self.confirm = Some(end);
        }
    }

    fn change(&mut self, message: Message) -> Result<(), ReaderError> {
        match message {
            Message::Relation(relation) => {
                let columns = (relation.name == "products")
                    .then(|| Columns::of(&relation))
                    .flatten();
                self.relations.insert(relation.id, columns);
            }
            Message::Insert { relation, new } => {
                if let Some(columns) = self.columns(relation) {
                    let row = row(columns, "INSERT", &new, None)?;
                    self.tx.changes.push(row);
                }
            }
            Message::Update { relation, old, new } => {
                if let Some(columns) = self.columns(relation) {
                    let after = row(columns, "UPDATE", &new, old.as_ref())?;
                    let before = old
                        .as_ref()
                        .map(|old| row(columns, "DELETE", old, None))
                        .transpose()?;
                    match before {
                        // A key change: the old id disappears, then the new one appears (as
                        // the trigger records it, migration 0005).
                        Some(before) if before.product_id != after.product_id => {
                            self.tx.changes.push(before);
                            self.tx.changes.push(RowChange {
                                action: "INSERT",
                                ..after
                            });
                        }
                        _ => self.tx.changes.push(after),
                    }
                }
            }
            Message::Delete { relation, old } => {
                if let Some(columns) = self.columns(relation) {
                    let row = row(columns, "DELETE", &old, None)?;
                    self.tx.changes.push(row);
                }
            }
            Message::Truncate { relations } => {
                if relations.iter().any(|id| self.columns(*id).is_some()) {
                    self.tx.truncate = true;
                }
            }
            Message::Other => {}
        }
        Ok(())
    }

    fn columns(&self, relation: u32) -> Option<Columns> {
        self.relations.get(&relation).copied().flatten()
    }
}

/// A products row out of a tuple; unchanged TOASTed values come from `old`.
fn row(
    columns: Columns,
    action: &'static str,
    tuple: &Tuple,
    old: Option<&Tuple>,
) -> Result<RowChange, ReaderError> {
    let text = |at: usize| -> Result<String, ReaderError> {
        let value = match tuple.get(at) {
            Some(Value::Unchanged) => old.and_then(|old| old.get(at)),
            other => other,
        };
        match value {
            Some(Value::Text(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            _ => Err(ReaderError::Row(format!(
                "column {at} of a {action} is missing (is REPLICA IDENTITY FULL set?)"
            ))),
        }
    };
    let number = |at: usize| -> Result<i64, ReaderError> {
        text(at)?
            .parse()
            .map_err(|_| ReaderError::Row(format!("column {at} is not an integer")))
    };
    Ok(RowChange {
        action,
        product_id: number(columns.product_id)?,
        manufacturer: text(columns.manufacturer)?,
        price_per_unit: text(columns.price_per_unit)?,
        units_available: i32::try_from(number(columns.units_available)?)
            .map_err(|_| ReaderError::Row("units_available out of range".into()))?,
        product_name: text(columns.product_name)?,
        committed_at_micros: 0,
    })
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes};
    use pgwire_replication::Lsn;

    use super::*;

    fn relation() -> Bytes {
        let mut msg = vec![b'R'];
        msg.put_u32(1);
        msg.put_slice(b"public\0products\0");
        msg.put_u8(b'f');
        let names = [
            "product_id",
            "manufacturer",
            "price_per_unit",
            "units_available",
            "product_name",
        ];
        msg.put_u16(5);
        for name in names {
            msg.put_u8(0);
            msg.put_slice(name.as_bytes());
            msg.put_u8(0);
            msg.put_u32(25);
            msg.put_u32(u32::MAX);
        }
        Bytes::from(msg)
    }

    fn insert(id: i64) -> Bytes {
        let mut msg = vec![b'I'];
        msg.put_u32(1);
        msg.put_u8(b'N');
        msg.put_u16(5);
        for value in [
            id.to_string(),
            "Acme".into(),
            "1".into(),
            "3".into(),
            "n".into(),
        ] {
            msg.put_u8(b't');
            msg.put_u32(u32::try_from(value.len()).unwrap());
            msg.put_slice(value.as_bytes());
        }
        Bytes::from(msg)
    }

    fn decoder(armed: bool, applied: Option<u64>) -> Decoder {
        Decoder::new(armed, applied)
    }

    fn transaction(decoder: &mut Decoder, id: i64, end: u64, marker: bool) {
        decoder
            .handle(ReplicationEvent::Begin {
                final_lsn: Lsn(end),
                xid: 1,
                commit_time_micros: 5,
            })
            .unwrap();
        decoder
            .handle(ReplicationEvent::XLogData {
                wal_start: Lsn(0),
                wal_end: Lsn(0),
                server_time_micros: 0,
                data: relation(),
            })
            .unwrap();
        decoder
            .handle(ReplicationEvent::XLogData {
                wal_start: Lsn(0),
                wal_end: Lsn(0),
                server_time_micros: 0,
                data: insert(id),
            })
            .unwrap();
        if marker {
            decoder
                .handle(ReplicationEvent::Message {
                    transactional: true,
                    lsn: Lsn(end),
                    prefix: MARKER_PREFIX.into(),
                    content: Bytes::from_static(MARKER_CONTENT),
                })
                .unwrap();
        }
        decoder
            .handle(ReplicationEvent::Commit {
                lsn: Lsn(end),
                end_lsn: Lsn(end),
                commit_time_micros: 5,
            })
            .unwrap();
    }

    #[test]
    fn changes_before_the_marker_were_the_triggers() {
        let mut decoder = decoder(false, None);
        transaction(&mut decoder, 1, 10, false);
        assert!(decoder.batch.changes.is_empty());
        assert_eq!(
            decoder.confirm,
            Some(10),
            "nothing to write: confirm at once"
        );
        transaction(&mut decoder, 2, 20, true);
        assert!(decoder.batch.armed && decoder.ready_to_write());
        transaction(&mut decoder, 3, 30, false);
        let ids: Vec<i64> = decoder.batch.changes.iter().map(|c| c.product_id).collect();
        assert_eq!(ids, [3]);
        assert_eq!(decoder.batch.lsn, 30);
        assert_eq!(decoder.batch.changes[0].committed_at_micros, 5);
    }

    #[test]
    fn transactions_already_written_are_skipped_after_a_restart() {
        let mut decoder = decoder(true, Some(20));
        transaction(&mut decoder, 1, 20, false);
        assert!(decoder.batch.changes.is_empty());
        transaction(&mut decoder, 2, 21, false);
        assert_eq!(decoder.batch.changes.len(), 1);
    }

    #[test]
    fn keepalives_confirm_only_with_nothing_pending() {
        let mut decoder = decoder(true, None);
        transaction(&mut decoder, 1, 10, false);
        decoder.confirm = None;
        decoder
            .handle(ReplicationEvent::KeepAlive {
                wal_end: Lsn(50),
                reply_requested: false,
                server_time_micros: 0,
            })
            .unwrap();
        assert_eq!(decoder.confirm, None, "the batch is not written yet");
        decoder.written();
        assert_eq!(decoder.confirm, Some(10));
        decoder
            .handle(ReplicationEvent::KeepAlive {
                wal_end: Lsn(50),
                reply_requested: false,
                server_time_micros: 0,
            })
            .unwrap();
        assert_eq!(decoder.confirm, Some(50));
    }
}
