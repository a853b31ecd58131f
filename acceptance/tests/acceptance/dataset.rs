//! A data fixture that a partial or sloppy restore cannot pass, and its checksum.
//!
//! `fill` writes, through a binding, what a real application leaves in its database:
//! tables in several schemas, text with quotes, backslashes, control characters and
//! non-ASCII (emoji included), bytea with zero bytes, jsonb, views, indexes (a unique
//! one among them), foreign keys, sequences advanced past their rows (one not yet
//! called), a large object, a table owned by the binding's own role rather than the
//! instance's owner, and a filler of incompressible bytes to give it a size.
//! `fingerprint` reads it all back in a deterministic order, section by section, so a
//! mismatch names what differs; `checksum` is the digest of the whole fingerprint. Both
//! only read: they must never change what they measure (no `nextval`, no writes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use crate::data::{connect, try_connect};
use crate::harness::Broker;

/// The instance's owner role: what bindings act as (their `role` setting).
const OWNER_ROLE: &str = "phoenix_owner";

/// The filler size most tests use: a few MB, quick to back up and restore.
pub const STANDARD_BYTES: usize = 3 * 1024 * 1024;
/// A filler large enough that a backup or restore of it is still running while a test
/// sends its next request (or kills the broker).
pub const LARGE_BYTES: usize = 32 * 1024 * 1024;

/// Bytes per filler row (512 MD5 digests of 16 bytes: incompressible).
const FILLER_ROW_BYTES: usize = 512 * 16;

/// Strings that break naive quoting, escaping or encoding.
const AWKWARD_TEXT: &[&str] = &[
    "O'Brien said \"hello\" and left",
    "back\\slash, \\n is not a newline, \\\\ double, \\x00 not a zero byte",
    "Grüße aus Köln – naïve café, ½ € ¿qué?",
    "日本語のテキストと한국어",
    "crab 🦀, elephant 🐘, family 👨‍👩‍👧",
    "tab\there and\nreal newline\r\nand CRLF",
    "'; DROP TABLE public.customers; --",
    "$$ dollar $quoted$ text $$",
    "",
    "trailing spaces   ",
];

/// What `fill` wrote, for tests that look at one part of it.
#[derive(Debug, Clone)]
pub struct Filled {
    /// Rows written overall (every table, the filler included).
    pub rows: i64,
    /// The large object's OID.
    pub large_object: u32,
}

/// Creates the dataset through a binding's session (which acts as the owner role).
/// `filler_bytes` of incompressible data come on top of a few thousand small rows.
pub async fn fill(client: &Client, filler_bytes: usize) -> Filled {
    let awkward: Vec<String> = AWKWARD_TEXT.iter().map(|s| (*s).to_owned()).collect();
    client
        .batch_execute(
            "CREATE SCHEMA sales;
             CREATE SCHEMA \"Audit Log\";
             CREATE TABLE public.customers (
                 id bigserial PRIMARY KEY,
                 name text NOT NULL,
                 email text NOT NULL,
                 avatar bytea,
                 profile jsonb,
                 born date,
                 score double precision
             );
             CREATE UNIQUE INDEX customers_email_key ON public.customers (lower(email));
             CREATE INDEX customers_name_idx ON public.customers (name COLLATE \"C\");
             CREATE TABLE sales.orders (
                 id bigint PRIMARY KEY,
                 customer_id bigint NOT NULL REFERENCES public.customers (id),
                 amount numeric(12, 2) NOT NULL CHECK (amount >= 0),
                 items jsonb NOT NULL,
                 placed_at timestamptz NOT NULL
             );
             CREATE INDEX orders_customer_idx ON sales.orders (customer_id);
             CREATE INDEX orders_items_idx ON sales.orders USING gin (items);
             CREATE SEQUENCE sales.invoice_numbers START 1000;
             CREATE SEQUENCE sales.untouched START 42;
             CREATE TABLE \"Audit Log\".\"Events\" (
                 at bigint NOT NULL,
                 kind text NOT NULL,
                 payload bytea NOT NULL
             );
             CREATE TABLE \"Audit Log\".filler (id int PRIMARY KEY, chunk bytea NOT NULL);
             CREATE TABLE public.blobs (name text PRIMARY KEY, blob oid NOT NULL);
             CREATE VIEW sales.customer_totals AS
                 SELECT c.id, c.name, count(o.id) AS orders, coalesce(sum(o.amount), 0) AS total
                 FROM public.customers c LEFT JOIN sales.orders o ON o.customer_id = c.id
                 GROUP BY c.id, c.name;",
        )
        .await
        .expect("creating the dataset's schema");
    client
        .execute(
            "INSERT INTO public.customers (name, email, avatar, profile, born, score)
             SELECT format('%s #%s', ($1::text[])[1 + i % array_length($1::text[], 1)], i),
                    format('Customer.%s@Example.org', i),
                    CASE WHEN i % 10 = 0 THEN NULL
                         ELSE '\\x00ff0000'::bytea || int8send(i) || '\\x00'::bytea END,
                    jsonb_build_object(
                        'i', i,
                        'tags', jsonb_build_array('vip', 'ü', '🦀', ($1::text[])[1 + i % array_length($1::text[], 1)]),
                        'nested', jsonb_build_object('quote', 'he said \"hi\"', 'nothing', NULL),
                        'ratio', i / 7.0),
                    date '1970-01-01' + i,
                    i / 3.0
             FROM generate_series(1, 1000) AS i",
            &[&awkward],
        )
        .await
        .expect("inserting customers");
    client
        .batch_execute(
            "INSERT INTO sales.orders (id, customer_id, amount, items, placed_at)
             SELECT i, 1 + (i * 7) % 1000, (i * 13 % 100000) / 100.0,
                    jsonb_build_array(jsonb_build_object('sku', 'SKU-' || i, 'qty', i % 5 + 1)),
                    timestamptz '2024-02-29 12:34:56.789+00' + make_interval(mins => i)
             FROM generate_series(1, 2000) AS i;
             -- Sequences past their rows: the next value must not collide after a restore.
             SELECT nextval('public.customers_id_seq') FROM generate_series(1, 57);
             SELECT setval('sales.invoice_numbers', 5000, false);
             INSERT INTO \"Audit Log\".\"Events\" (at, kind, payload)
             SELECT i, CASE WHEN i % 2 = 0 THEN 'login' ELSE 'logout' END,
                    '\\x0000'::bytea || int4send(i) || decode(md5(i::text), 'hex')
             FROM generate_series(1, 500) AS i;",
        )
        .await
        .expect("inserting orders and events");
    let large_object: u32 = client
        .query_one(
            "INSERT INTO public.blobs (name, blob)
             VALUES ('logo ✓', lo_from_bytea(0,
                 decode(repeat('00ff7f80', 20000), 'hex')
                 || (SELECT string_agg(decode(md5(i::text), 'hex'), ''::bytea)
                     FROM generate_series(1, 2000) AS i)))
             RETURNING blob",
            &[],
        )
        .await
        .expect("creating a large object")
        .get(0);
    // A table the binding's own role owns (an application that resets its role).
    client
        .batch_execute(
            // `RESET ROLE` would return to the role's default, which is the owner role.
            "SET ROLE NONE;
             CREATE TABLE public.binding_notes (id int PRIMARY KEY, body text NOT NULL);
             INSERT INTO public.binding_notes
             SELECT i, format('note %s by %s', i, current_user) FROM generate_series(1, 300) AS i;
             -- Shared with the owner role, so every binding (of a copy too) can read it.
             GRANT SELECT ON public.binding_notes TO phoenix_owner;",
        )
        .await
        .expect("creating a table as the binding's own role");
    client
        .batch_execute(&format!("SET ROLE {OWNER_ROLE}"))
        .await
        .expect("back to the owner role");
    let filler_rows = filler_bytes.div_ceil(FILLER_ROW_BYTES) as i32;
    client
        .execute(
            "INSERT INTO \"Audit Log\".filler (id, chunk)
             SELECT i, (SELECT string_agg(decode(md5(random()::text || i || j), 'hex'), ''::bytea)
                        FROM generate_series(1, 512) AS j)
             FROM generate_series(1, $1::int) AS i",
            &[&filler_rows],
        )
        .await
        .expect("inserting the filler");
    client
        .batch_execute("ANALYZE")
        .await
        .expect("analyzing the dataset");
    Filled {
        rows: 1000 + 2000 + 500 + 1 + 300 + i64::from(filler_rows),
        large_object,
    }
}

/// Changes exactly one byte of one row (the first filler row's 100th byte).
pub async fn change_one_byte(client: &Client) {
    let changed = client
        .execute(
            "UPDATE \"Audit Log\".filler SET chunk = set_byte(chunk, 99, get_byte(chunk, 99) # 1)
             WHERE id = (SELECT min(id) FROM \"Audit Log\".filler)",
            &[],
        )
        .await
        .expect("changing one byte");
    assert_eq!(changed, 1, "one row changed");
}

/// What a restore would have to bring back: one digest (or short text) per section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub sections: BTreeMap<String, String>,
}

impl Fingerprint {
    /// The sections whose values differ (or exist on one side only), for failure messages.
    pub fn differences(&self, other: &Fingerprint) -> Vec<String> {
        let mut names: Vec<&String> = self.sections.keys().chain(other.sections.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| self.sections.get(*name) != other.sections.get(*name))
            .map(|name| {
                format!(
                    "{name}: {} vs {}",
                    self.sections.get(name).map_or("(absent)", String::as_str),
                    other.sections.get(name).map_or("(absent)", String::as_str)
                )
            })
            .collect()
    }

    /// What a copy of this data (a clone or a fork) holds: the source's binding roles do
    /// not exist in a new instance, so what they owned belongs to the owner role there,
    /// where every binding of the copy can use it.
    pub fn as_copied(&self) -> Fingerprint {
        let mut copied = self.clone();
        if let Some(owners) = copied.sections.get_mut(OWNERS) {
            *owners = owners
                .lines()
                .map(|line| match line.strip_suffix("\tbinding") {
                    Some(object) => format!("{object}\towner"),
                    None => line.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        copied
    }

    /// The canonical text the checksum is the digest of.
    fn canonical(&self) -> String {
        self.sections
            .iter()
            .map(|(name, value)| format!("{name}={value}\n"))
            .collect()
    }
}

/// The section that says who owns each relation, schema and large object.
const OWNERS: &str = "owners";

/// User schemas: everything but PostgreSQL's own.
const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// How an owner shows in the fingerprint: the instance's owner, a binding's role (any
/// binding: their names derive from binding IDs), a superuser, or something else.
fn owner_class(column: &str) -> String {
    format!(
        "(SELECT CASE WHEN r.rolname = '{OWNER_ROLE}' THEN 'owner' \
                 WHEN r.rolsuper THEN 'superuser:' || r.rolname \
                 WHEN pg_has_role(r.oid, '{OWNER_ROLE}', 'MEMBER') THEN 'binding' \
                 ELSE 'other:' || r.rolname END \
          FROM pg_roles r WHERE r.oid = {column})"
    )
}

/// The single text column of a query's rows, sorted bytewise.
async fn rows_of(client: &Client, query: &str) -> Vec<String> {
    let query = format!("SELECT item FROM ({query}) AS q(item) ORDER BY item COLLATE \"C\"");
    client
        .query(&query, &[])
        .await
        .unwrap_or_else(|e| panic!("fingerprint query failed: {e:?}\n{query}"))
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect()
}

/// Digest of a relation's rows, independent of their physical order: `count:sha256`.
async fn relation_digest(client: &Client, relation: &str) -> String {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), encode(sha256(convert_to(coalesce(
                     string_agg(h, '' ORDER BY h COLLATE \"C\"), ''), 'UTF8')), 'hex')
                 FROM (SELECT encode(sha256(convert_to(t::text, 'UTF8')), 'hex') AS h
                       FROM {relation} AS t) AS rows"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("reading {relation}: {e:?}"));
    format!("{}:{}", row.get::<_, i64>(0), row.get::<_, String>(1))
}

async fn sha256_hex(client: &Client, text: &str) -> String {
    client
        .query_one(
            "SELECT encode(sha256(convert_to($1::text, 'UTF8')), 'hex')",
            &[&text],
        )
        .await
        .expect("sha256")
        .get(0)
}

/// Reads everything the dataset consists of, in a deterministic order.
pub async fn fingerprint(client: &Client) -> Fingerprint {
    let mut sections = BTreeMap::new();
    let relations = rows_of(
        client,
        &format!(
            "SELECT concat_ws(chr(9), c.relkind::text,
                    quote_ident(n.nspname) || '.' || quote_ident(c.relname))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE {USER_SCHEMAS} AND c.relkind IN ('r', 'p', 'v', 'm', 'S')"
        ),
    )
    .await;
    sections.insert("relations".to_owned(), relations.join("\n"));
    for relation in &relations {
        let mut parts = relation.split('\t');
        let (kind, name) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        match kind {
            "r" | "p" | "v" | "m" => {
                sections.insert(format!("rows {name}"), relation_digest(client, name).await);
            }
            "S" => {
                let row = client
                    .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
                    .await
                    .unwrap_or_else(|e| panic!("reading sequence {name}: {e:?}"));
                sections.insert(
                    format!("sequence {name}"),
                    format!("{} {}", row.get::<_, i64>(0), row.get::<_, bool>(1)),
                );
            }
            _ => {}
        }
    }
    let owners = rows_of(
        client,
        &format!(
            "SELECT concat_ws(chr(9), 'relation', quote_ident(n.nspname) || '.' || quote_ident(c.relname), {})
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE {USER_SCHEMAS} AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
             UNION ALL
             SELECT concat_ws(chr(9), 'schema', quote_ident(n.nspname), {})
             FROM pg_namespace n WHERE {USER_SCHEMAS}
             UNION ALL
             SELECT concat_ws(chr(9), 'large object', m.oid::text, {})
             FROM pg_largeobject_metadata m",
            owner_class("c.relowner"),
            owner_class("n.nspowner"),
            owner_class("m.lomowner"),
        ),
    )
    .await;
    sections.insert(OWNERS.to_owned(), owners.join("\n"));
    let definitions = [
        (
            "indexes",
            "SELECT quote_ident(schemaname) || ' ' || indexdef FROM pg_indexes
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "views",
            "SELECT quote_ident(schemaname) || '.' || quote_ident(viewname) || ' AS ' || definition
             FROM pg_views WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "constraints",
            "SELECT conrelid::regclass::text || ' ' || quote_ident(conname) || ' '
                    || pg_get_constraintdef(c.oid)
             FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')",
        ),
    ];
    for (name, query) in definitions {
        let rows = rows_of(client, query).await;
        sections.insert(
            name.to_owned(),
            format!(
                "{}:{}",
                rows.len(),
                sha256_hex(client, &rows.join("\n")).await
            ),
        );
    }
    let large_objects = rows_of(
        client,
        "SELECT m.oid::text || ' ' || encode(sha256(lo_get(m.oid)), 'hex')
         FROM pg_largeobject_metadata m",
    )
    .await;
    sections.insert("large objects".to_owned(), large_objects.join("\n"));
    Fingerprint { sections }
}

/// The digest of everything `fingerprint` reads.
pub async fn checksum(client: &Client) -> String {
    let fingerprint = fingerprint(client).await;
    sha256_hex(client, &fingerprint.canonical()).await
}

/// Asserts that the database behind `client` holds exactly the data `expected` describes,
/// naming the sections that differ.
#[track_caller]
pub fn assert_same_data(expected: &Fingerprint, actual: &Fingerprint, what: &str) {
    let differences = expected.differences(actual);
    assert!(
        differences.is_empty(),
        "{what}: the data differs (expected vs actual):\n  {}",
        differences.join("\n  ")
    );
}

/// Connects with a binding's credentials, waiting (generously) for a server that is
/// being restarted or swapped by a restore.
pub async fn connect_eventually(credentials: &Value) -> Client {
    let started = Instant::now();
    loop {
        match try_connect(credentials).await {
            Ok(client) => return client,
            Err(error) => assert!(
                started.elapsed() < Duration::from_secs(120),
                "the binding's credentials do not connect: {error:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fingerprint of the instance behind a binding (a fresh session each time: a
/// restore may have ended the old ones).
pub async fn fingerprint_of(credentials: &Value) -> Fingerprint {
    fingerprint(&connect_eventually(credentials).await).await
}

#[tokio::test]
async fn dataset_checksum_changes_when_one_byte_of_one_row_changes() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let client = connect(&credentials).await;
    let filled = fill(&client, STANDARD_BYTES).await;
    assert!(filled.rows > 3000, "a few thousand rows: {filled:?}");

    let before = fingerprint(&client).await;
    let first = checksum(&client).await;
    // Another session, same data: the checksum depends on the data only.
    let again = checksum(&connect(&credentials).await).await;
    assert_eq!(first, again, "the checksum is deterministic");
    assert_eq!(first.len(), 64, "a SHA-256 in hex: {first}");

    change_one_byte(&client).await;
    let after = fingerprint(&client).await;
    assert_ne!(
        first,
        checksum(&client).await,
        "one changed byte changes the checksum"
    );
    assert_eq!(
        before.differences(&after).len(),
        1,
        "only the changed table's section differs: {:?}",
        before.differences(&after)
    );
}

#[tokio::test]
async fn dataset_checksum_sees_sequences_large_objects_owners_indexes_and_text() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let client = connect(&credentials).await;
    let filled = fill(&client, 64 * 1024).await;

    // What the fixture promises is really there.
    let owners: Vec<String> = rows_of(
        &client,
        &format!(
            "SELECT c.relname || '=' || {} FROM pg_class c
             WHERE c.relname IN ('binding_notes', 'customers') ORDER BY 1",
            owner_class("c.relowner")
        ),
    )
    .await;
    assert_eq!(owners, ["binding_notes=binding", "customers=owner"]);
    let before = fingerprint(&client).await;
    assert_eq!(
        before.differences(&before.as_copied()).len(),
        1,
        "a copy differs in who owns the binding's table, nothing else"
    );
    let emoji: i64 = client
        .query_one(
            "SELECT count(*) FROM public.customers WHERE name LIKE '%🦀%'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(emoji > 0, "text with an emoji");

    let mut previous = checksum(&client).await;
    let changes = [
        (
            "a sequence's value",
            "SELECT nextval('sales.invoice_numbers')".to_owned(),
        ),
        (
            "a large object's byte",
            format!("SELECT lo_put({}, 5, '\\x01')", filled.large_object),
        ),
        (
            "a table's owner",
            format!(
                "SET ROLE NONE; ALTER TABLE public.binding_notes OWNER TO {OWNER_ROLE}; \
                 SET ROLE {OWNER_ROLE}"
            ),
        ),
        (
            "an index",
            "DROP INDEX public.customers_name_idx".to_owned(),
        ),
        (
            "a backslash in a text",
            "UPDATE public.customers SET name = replace(name, '\\', '/') WHERE name LIKE '%\\\\%'"
                .to_owned(),
        ),
        (
            "a view's definition",
            "CREATE OR REPLACE VIEW sales.customer_totals AS
             SELECT c.id, c.name, count(o.id) AS orders, coalesce(sum(o.amount), 1) AS total
             FROM public.customers c LEFT JOIN sales.orders o ON o.customer_id = c.id
             GROUP BY c.id, c.name"
                .to_owned(),
        ),
    ];
    for (what, sql) in changes {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("changing {what}: {e:?}"));
        let now = checksum(&client).await;
        assert_ne!(previous, now, "the checksum sees {what}");
        previous = now;
    }
}
