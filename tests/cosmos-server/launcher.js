#!/usr/bin/env node
/*
 * Cosmos DB NoSQL test server for integration tests.
 *
 * Usage:   node launcher.js <port>        (0 = let the OS pick a free port)
 * Prints:  exactly one line "LISTENING <port>" on stdout once the HTTPS
 *          server accepts connections on 127.0.0.1. Everything else goes to
 *          stderr. Exits with code 0 on SIGTERM / SIGINT.
 * Env:     COSMOS_LAUNCHER_DEBUG=1 logs every request (method, path, the
 *          Cosmos headers that matter here, status) to stderr.
 *
 * It serves `@vercel/cosmosdb-server` 1.0.1 (in-memory, no auth check, bundled
 * self-signed certificate) through the package's JS API, after applying the
 * small monkey-patches below. Each patch is named PATCH (a)...(h) and states
 * the real Cosmos DB behaviour it restores. The patches replace exported
 * functions of the package's internal modules; they must run BEFORE
 * `lib/index.js` (and through it `lib/routes.js`) is required, because
 * `routes.js` captures the handler functions when it is first loaded.
 */

"use strict";

const path = require("path");

const LIB = path.dirname(require.resolve("@vercel/cosmosdb-server"));
const lib = rel => require(path.join(LIB, rel));

const HOST = "127.0.0.1";
const PK_HEADER = "x-ms-documentdb-partitionkey";
const DEBUG = !!process.env.COSMOS_LAUNCHER_DEBUG;

const jsonBody = lib("json").default;
const trueHeader = lib("true-header").default;
const readItems = lib("handler/_read-items").default;
const Items = lib("account/items").default;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** Raw value of the partition-key request header, or undefined. */
function rawPartitionHeader(req) {
  const h = req.headers[PK_HEADER];
  return Array.isArray(h) ? h[0] : h;
}

/**
 * Parses the partition-key header (`["a"]`, `"a"`, `[1]`, ...) into the
 * single (first-path) value the package stores documents under.
 * Returns { present: false } when the header is absent or names no value
 * (`[]`, `[{}]` = "none"/undefined as sent for cross-partition requests).
 */
function parsePartitionHeader(req) {
  const raw = rawPartitionHeader(req);
  if (raw === undefined || raw === "") return { present: false };
  let parsed;
  try {
    parsed = JSON.parse(raw);
  } catch (err) {
    return { present: false, invalid: true };
  }
  if (Array.isArray(parsed)) {
    if (parsed.length === 0) return { present: false };
    const [first] = parsed;
    if (first !== null && typeof first === "object" && Object.keys(first).length === 0) {
      return { present: false }; // [{}] = "undefined" partition key / no key
    }
    return { present: true, value: first };
  }
  return { present: true, value: parsed };
}

function samePartition(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function notFound() {
  return {
    code: "NotFound",
    message: "Entity with the specified id does not exist in the system.,"
  };
}

/** The collection's default TTL in seconds, or undefined when TTL is off. */
function defaultTtlOf(collectionData) {
  if (!collectionData) return undefined;
  const t = collectionData.defaultTtl;
  return typeof t === "number" ? t : undefined;
}

/**
 * Real Cosmos: when the container has TTL enabled (`defaultTtl` present, -1
 * or > 0), an item expires `ttl` seconds after its last write (`_ts`); the
 * item's own `ttl` overrides the container default, `-1` means never. When
 * the container has no `defaultTtl`, item `ttl` values are ignored.
 */
function isExpired(doc, containerDefaultTtl, nowSecs) {
  if (containerDefaultTtl === undefined || !doc) return false;
  const ttl = typeof doc.ttl === "number" ? doc.ttl : containerDefaultTtl;
  if (!(ttl > 0) || typeof doc._ts !== "number") return false;
  return nowSecs >= doc._ts + ttl;
}

// ---------------------------------------------------------------------------
// PATCH (a): partition-key-range ids are strings.
// Real Cosmos returns `"id": "0"` in the /pkranges feed. The package creates
// the single range of every container with the number 0, which makes the
// Rust SDK fail to load the partition topology (503/20305) for every
// ContainerClient operation.
// ---------------------------------------------------------------------------
{
  const PartitionKeyRanges = lib("account/partition-key-ranges").default;
  PartitionKeyRanges.prototype.create = function createWithStringId(data) {
    return Items.prototype.create.call(this, { ...data, id: String(data.id) });
  };
}

// ---------------------------------------------------------------------------
// PATCH (b): reading a missing item (or an existing id under another
// partition key) answers 404 NotFound.
// The package's handler dereferences the missing document and answers 500
// ("Cannot read properties of undefined"), which the SDK retries.
// ---------------------------------------------------------------------------
{
  const mod = lib("handler/read-document");
  mod.default = (account, req, res, { dbId, collId, docId }) => {
    const collection = account.database(dbId).collection(collId);
    const collData = collection.read();
    if (!collData) {
      res.statusCode = 404;
      return notFound();
    }
    const pk = parsePartitionHeader(req);
    const docs = collection.documents;
    const partition = pk.present ? pk.value : docId;
    const data = collection.document(docId, partition).read();
    if (
      !data ||
      data.id !== docId ||
      (pk.present && !samePartition(docs._getPartition(data), pk.value)) ||
      isExpired(data, defaultTtlOf(collData), Date.now() / 1e3) // see PATCH (f)
    ) {
      res.statusCode = 404;
      return notFound();
    }
    res.statusCode = 200;
    return data;
  };
}

// ---------------------------------------------------------------------------
// PATCH (c) + (d): document queries.
// (c) Real Cosmos runs a query that carries `x-ms-documentdb-partitionkey`
//     only against that logical partition, whatever the WHERE clause says.
//     The package ignored the header and ran it over the whole container.
// (d) Real Cosmos accepts queries whose WHERE does not name the partition
//     key, and cross-partition queries (fan-out over the partition key
//     ranges; here there is exactly one range). The package answered
//     400 "missing partition keys" unless the cross-partition header was set.
// Also: expired items (PATCH (f)) are never returned.
// ---------------------------------------------------------------------------
{
  const mod = lib("handler/query-documents");
  mod.default = async (account, req, res, { dbId, collId }) =>
    readItems(req, res, "Documents", async ({ continuation, maxItemCount }) => {
      const body = await jsonBody(req);
      // Real Cosmos answers `x-ms-cosmos-is-query-plan-request` with a query
      // plan; the package cannot produce one and used to answer with
      // documents, which the SDK misreads (500/20302 "query plan produced no
      // partition ranges"). The SDK only asks for a gateway plan for queries
      // its local planner rejects (e.g. cross-partition aggregates / GROUP BY,
      // which the SDK cannot execute anyway), so fail those clearly instead.
      if (trueHeader(req, "x-ms-cosmos-is-query-plan-request")) {
        res.statusCode = 400;
        return {
          code: "BadRequest",
          message:
            "cosmos test server: gateway query plans are not implemented " +
            "(cross-partition aggregate/GROUP BY query?); scope the query to one partition"
        };
      }
      if (!body.query) {
        res.statusCode = 400;
        return { message: "missing query" };
      }
      const collection = account.database(dbId).collection(collId);
      const collData = collection.read();
      if (!collData) return null; // -> 404
      const docs = collection.documents;
      const pk = parsePartitionHeader(req);
      const defaultTtl = defaultTtlOf(collData);
      const now = Date.now() / 1e3;
      const data = [];
      for (const item of docs._data.values()) {
        const d = item.read();
        if (!d || isExpired(d, defaultTtl, now)) continue;
        if (pk.present && !samePartition(docs._getPartition(d), pk.value)) continue;
        data.push(d);
      }
      const compositeIndexes =
        (collData.indexingPolicy && collData.indexingPolicy.compositeIndexes) || [];
      // A syntax error is thrown here and mapped to 400 by _read-items.
      const q = docs._getQuery(body.query);
      try {
        return q.exec(data, {
          parameters: body.parameters,
          udf: docs._userDefinedFunctions(),
          maxItemCount,
          continuation,
          compositeIndexes
        });
      } catch (err) {
        res.statusCode = 400;
        return { code: "BadRequest", message: err.message };
      }
    });
}

// ---------------------------------------------------------------------------
// PATCH (e): transactional batch.
// Real Cosmos: the batch's partition key comes from the request header
// `x-ms-documentdb-partitionkey` (the SDK puts none in the operations);
// every operation's body must belong to that partition (else 400); Create,
// Upsert, Replace (with ifMatch), Read and Delete (with ifMatch) are
// supported; the batch is all-or-nothing: on the first failing operation
// nothing is applied and the response is 207 Multi-Status whose array holds
// the failing operation's status and 424 Failed Dependency for the others;
// 200 with one result per operation when all succeed.
// The package parsed a per-operation partitionKey that the SDK never sends
// (500 "Failed to parse x-ms-documentdb-partitionkey") and applied
// operations one by one without rollback.
// ---------------------------------------------------------------------------
{
  const ops = lib("handler/_document-operations");
  const PRECONDITION_FAILED = {
    statusCode: 412,
    body: {
      code: "PreconditionFailed",
      message: "Operation cannot be performed because one of the specified precondition is not met."
    }
  };
  const badRequest = (res, message) => {
    res.statusCode = 400;
    return { code: "BadRequest", message };
  };

  const mod = lib("handler/batch-documents");
  mod.default = async (account, req, res, { dbId, collId }) => {
    const body = await jsonBody(req);
    const collection = account.database(dbId).collection(collId);
    const collData = collection.read();
    if (!collData) {
      res.statusCode = 404;
      return notFound();
    }
    if (!Array.isArray(body)) return badRequest(res, "Invalid request body");
    if (body.length > 100) return badRequest(res, "Transactional batch cannot exceed 100 operations");
    const pk = parsePartitionHeader(req);
    if (!pk.present) {
      return badRequest(res, "Transactional batch requires x-ms-documentdb-partitionkey");
    }
    const rawPk = rawPartitionHeader(req);
    const docs = collection.documents;
    const defaultTtl = defaultTtlOf(collData);

    // Validate the whole batch before touching anything.
    for (const op of body) {
      const type = op && op.operationType;
      if (!["Create", "Upsert", "Replace", "Read", "Delete"].includes(type)) {
        return badRequest(res, `Operation type '${type}' is not supported in Batch.`);
      }
      if (["Create", "Upsert", "Replace"].includes(type)) {
        const doc = op.resourceBody;
        if (!doc || typeof doc !== "object" || !doc.id) return badRequest(res, "Missing 'id' field in document");
        if (op.id !== undefined && op.id !== doc.id) {
          return badRequest(res, "Document id in request body must match the batch operation id");
        }
        if (!samePartition(docs._getPartition(doc), pk.value)) {
          return badRequest(res, "Transactional batch operations must use the batch partition key");
        }
      } else if (!op.id) {
        return badRequest(res, "Missing 'id' in batch operation");
      }
    }

    // Snapshot for rollback (documents are immutable objects replaced on write,
    // so shallow copies of the maps are enough). Node is single-threaded and
    // nothing below awaits, so the batch is isolated from other requests.
    const snapshot = {
      data: new Map(docs._data),
      index: new Map(docs._index),
      ridCount: docs._ridCount
    };
    const current = id => {
      const d = collection.document(id, pk.value).read();
      return d && d.id === id && !isExpired(d, defaultTtl, Date.now() / 1e3) ? d : undefined;
    };

    const results = [];
    let failedAt = -1;
    let failure;
    for (let i = 0; i < body.length; i += 1) {
      const op = body[i];
      const id = op.id || (op.resourceBody && op.resourceBody.id);
      const existing = current(id);
      let r;
      switch (op.operationType) {
        case "Create":
          r = ops.createOperation(collection, { resourceBody: op.resourceBody });
          break;
        case "Upsert":
          if (existing && ((op.ifMatch && op.ifMatch !== existing._etag) || op.ifNoneMatch === "*")) {
            r = PRECONDITION_FAILED;
          } else {
            r = ops.upsertOperation(collection, {
              partitionKey: rawPk,
              ifMatch: op.ifMatch,
              resourceBody: op.resourceBody
            });
          }
          break;
        case "Replace":
          r = ops.replaceOperation(collection, {
            partitionKey: rawPk,
            ifMatch: op.ifMatch,
            resourceBody: op.resourceBody
          });
          break;
        case "Read":
          if (!existing) r = { statusCode: 404, body: notFound() };
          else if (op.ifMatch && op.ifMatch !== existing._etag) r = PRECONDITION_FAILED;
          else if (op.ifNoneMatch && op.ifNoneMatch === existing._etag) r = { statusCode: 304, body: existing };
          else r = { statusCode: 200, body: existing };
          break;
        case "Delete":
          r = existing
            ? ops.deleteOperation(collection, { partitionKey: rawPk, ifMatch: op.ifMatch, id })
            : { statusCode: 404, body: notFound() };
          if (r.statusCode < 300) r = { statusCode: 204, body: { _etag: existing._etag } };
          break;
        default:
          break;
      }
      if (r.statusCode >= 400) {
        failedAt = i;
        failure = r;
        break;
      }
      const etag = r.body ? r.body._etag : undefined;
      const entry = { statusCode: r.statusCode, requestCharge: 1 };
      if (etag) entry.eTag = etag;
      if (r.statusCode !== 204 && r.statusCode !== 304 && r.body && r.body.id) entry.resourceBody = r.body;
      results.push(entry);
    }

    if (failedAt >= 0) {
      docs._data = snapshot.data;
      docs._index = snapshot.index;
      docs._ridCount = snapshot.ridCount;
      res.statusCode = 207;
      return body.map((_, i) =>
        i === failedAt
          ? { statusCode: failure.statusCode, requestCharge: 0 }
          : { statusCode: 424, requestCharge: 0 }
      );
    }
    res.statusCode = 200;
    return results;
  };
}

// ---------------------------------------------------------------------------
// PATCH (f): TTL expiry.
// Real Cosmos deletes items whose time to live has passed (item `ttl`, or
// the container's `defaultTtl`, counted from `_ts`; -1 = never; item ttl is
// ignored when the container has no defaultTtl) and never returns them
// again. The package stored the values but never expired anything. A
// sweeper deletes expired items every 500 ms; point reads, queries and
// batches (PATCHES (b), (c), (e)) already hide items expired in between.
// To find the containers, the Account class is wrapped so the launcher
// keeps a reference to the account the server creates on "listening".
// ---------------------------------------------------------------------------
const accounts = [];
{
  const mod = lib("account");
  const Account = mod.default;
  mod.default = class TrackedAccount extends Account {
    constructor(...args) {
      super(...args);
      accounts.push(this);
    }
  };
}

function sweepExpired() {
  const now = Date.now() / 1e3;
  for (const account of accounts) {
    for (const dbItem of account.databases._data.values()) {
      if (!dbItem.collections) continue;
      for (const collItem of dbItem.collections._data.values()) {
        const defaultTtl = defaultTtlOf(collItem.read());
        if (defaultTtl === undefined || !collItem.documents) continue;
        const docs = collItem.documents;
        for (const docItem of [...docs._data.values()]) {
          const d = docItem.read();
          if (isExpired(d, defaultTtl, now)) {
            try {
              docs.delete(d.id, docs._getPartition(d));
            } catch (err) {
              console.error(`ttl sweeper: could not delete ${d.id}: ${err.message}`);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// PATCH (h): resource ids of databases and containers are URL-safe.
// Real Cosmos DB resource ids never hold '/' or '+'; the package encodes its
// counters in plain base64, so the 63rd database of a run gets an id such as
// "gAA/AA==" that clients cannot split into database and container parts.
// Counters whose id would hold either character are skipped (per parent, so
// every id stays unique and stable).
// ---------------------------------------------------------------------------
function urlSafeRids(Cls) {
  const original = Cls.prototype._rid;
  Cls.prototype._rid = function (id) {
    if (!this.__cleanRids) {
      this.__cleanRids = [];
      this.__nextRid = 1;
    }
    while (this.__cleanRids.length < id) {
      const rid = original.call(this, this.__nextRid++);
      if (!/[/+]/.test(rid)) this.__cleanRids.push(rid);
    }
    return this.__cleanRids[id - 1];
  };
}
urlSafeRids(lib("account/databases").default);
urlSafeRids(lib("account/collections").default);

// ---------------------------------------------------------------------------
// PATCH (g): `_etag` values -- deliberately NOT patched.
// Real Cosmos etags are opaque quoted strings ("\"0000d...\""); the package
// uses unquoted UUIDs. Clients must treat etags as opaque and echo them back
// verbatim in If-Match, which works unchanged against both.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Start the server (after all patches: this loads lib/routes.js).
// ---------------------------------------------------------------------------
function main() {
  const portArg = process.argv[2] === undefined ? "0" : process.argv[2];
  const port = Number.parseInt(portArg, 10);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`usage: node launcher.js <port>   (0 = any free port); got ${portArg}`);
    process.exit(2);
  }

  const { createHttpsServer } = lib("index");
  const server = createHttpsServer();

  if (DEBUG) {
    server.prependListener("request", (req, res) => {
      const h = req.headers;
      const pick = [
        PK_HEADER,
        "x-ms-documentdb-partitionkeyrangeid",
        "x-ms-documentdb-query-enablecrosspartition",
        "x-ms-cosmos-is-query-plan-request",
        "x-ms-max-item-count",
        "x-ms-continuation",
        "if-match",
        "x-ms-documentdb-is-upsert",
        "x-ms-cosmos-is-batch-request",
        "content-type"
      ]
        .filter(k => h[k] !== undefined)
        .map(k => `${k}=${h[k]}`)
        .join(" ");
      res.on("finish", () => console.error(`[req] ${req.method} ${req.url} ${pick} -> ${res.statusCode}`));
    });
  }

  server.on("error", err => {
    console.error(`cosmos test server error: ${err.message}`);
    process.exit(1);
  });

  const sweeper = setInterval(sweepExpired, 500);

  server.listen(port, HOST, () => {
    process.stdout.write(`LISTENING ${server.address().port}\n`);
  });

  let stopping = false;
  const stop = signal => {
    if (stopping) return;
    stopping = true;
    clearInterval(sweeper);
    if (DEBUG) console.error(`received ${signal}, shutting down`);
    server.close(() => process.exit(0));
    if (typeof server.closeAllConnections === "function") server.closeAllConnections();
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
  // A test harness that spawns the launcher with a piped stdin can die without a chance to
  // send a signal (a panicking or killed test binary): the closed pipe then stops the server,
  // so no stray server outlives its tests.
  if (process.env.COSMOS_LAUNCHER_EXIT_ON_STDIN_EOF === "1") {
    process.stdin.on("end", () => stop("stdin EOF"));
    process.stdin.on("error", () => stop("stdin error"));
    process.stdin.resume();
  }
}

main();
