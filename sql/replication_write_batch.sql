-- The replication reader's changes, in commit order: $1 the seqs (taken by the same transaction,
-- ascending), then one array per field; the JSON is built exactly as the row trigger builds it
-- (migration 0005), so both sources store the same representation. $8: commit times in
-- microseconds since 2000-01-01 UTC, as the stream gives them.
INSERT INTO product_changes (seq, product_id, action, product, committed_at, bytes)
SELECT seq, product_id, action, body, committed_at, octet_length(body::text)
FROM (SELECT seq, product_id, action,
             timestamptz '2000-01-01 00:00:00+00'
                 + committed_micros * interval '1 microsecond' AS committed_at,
             json_build_object(
                 'productId',      product_id,
                 'manufacturer',   manufacturer,
                 'pricePerUnit',   price_per_unit,
                 'unitsAvailable', units_available,
                 'productName',    product_name) AS body
      FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::int[],
                  $7::text[], $8::bigint[])
           AS t(seq, product_id, action, manufacturer, price_per_unit, units_available,
                product_name, committed_micros)) AS changes
