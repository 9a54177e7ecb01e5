-- The replication reader's batch in ONE statement — one round trip and one implicit transaction:
-- fresh seqs in commit order for the changes ($1 … $7, one array per field, in commit order; $7
-- commit times in microseconds since 2000-01-01 UTC, as the stream gives them), the applied
-- position ($8, an LSN as text; $9 armed), and one notification naming the batch's last seq.
-- Returns that seq (NULL for a batch without changes, which notifies nothing), the server's WAL
-- insert and flush positions (`--replication-commit async`: read after the previous batch's
-- commit, the insert position bounds that commit's record), and the seqs and commit times
-- given to the changes, in commit order (the leader hands its committed changes to its own
-- listener; `committed_at` as the listener's changelog reads give it: microseconds since the Unix
-- epoch, as text, whatever the session's TimeZone and DateStyle). The JSON is built
-- exactly as the row trigger builds it (migration 0005), so both sources store the same
-- representation. Only the leading reader takes seqs while the triggers are off; the i-th change
-- gets the i-th smallest of the numbers taken, however the server evaluated the series.
WITH taken AS (
    SELECT row_number() OVER (ORDER BY seq) AS n, seq
    FROM (SELECT nextval('product_change_seq') AS seq
          FROM generate_series(1, cardinality($1::bigint[]))) AS fresh
),
changes AS (
    SELECT taken.seq, t.product_id, t.action,
           timestamptz '2000-01-01 00:00:00+00'
               + t.committed_micros * interval '1 microsecond' AS committed_at,
           json_build_object(
               'productId',      t.product_id,
               'manufacturer',   t.manufacturer,
               'pricePerUnit',   t.price_per_unit,
               'unitsAvailable', t.units_available,
               'productName',    t.product_name) AS body
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::bigint[])
         WITH ORDINALITY AS t(product_id, action, manufacturer, price_per_unit, units_available,
                              product_name, committed_micros, n)
    JOIN taken USING (n)
),
inserted AS (
    INSERT INTO product_changes (seq, product_id, action, product, committed_at, bytes)
    SELECT seq, product_id, action, body, committed_at, octet_length(body::text)
    FROM changes
    RETURNING seq, committed_at
),
position AS (
    UPDATE changelog_source SET applied_lsn = $8::text::pg_lsn, armed = $9
    RETURNING 1
)
SELECT batch.last,
       CASE WHEN batch.last IS NOT NULL
            THEN pg_notify('product_change', json_build_object('seq', batch.last)::text)
       END AS notified,
       pg_current_wal_insert_lsn()::text AS insert_lsn,
       pg_current_wal_flush_lsn()::text AS flush_lsn,
       batch.seqs,
       batch.committed_at
FROM (SELECT max(seq) AS last,
             array_agg(seq ORDER BY seq) AS seqs,
             array_agg((extract(epoch FROM committed_at) * 1000000)::bigint::text ORDER BY seq)
                 AS committed_at
      FROM inserted) AS batch,
     (SELECT count(*) FROM position) AS moved
