//! The server-side scripts of the fleet (Lua, run atomically by Redis and called by their
//! SHA: EVALSHA; after a Redis restart emptied its cache, redis-rs loads the script and
//! retries once). Time
//! is Redis's own (`TIME`), so instances' clocks never disagree about a lease or a rate.
//!
//! Keys (prefix `P`): `P instances` (sorted set: instance → lease deadline, ms),
//! `P conns:<instance>` (hash: field → connections that instance holds, plus the marker
//! field `~` saying the hash is registered; expires with the lease), `P rate:<address>`
//! (the address's GCRA theoretical arrival time, ms), `P revoked` (sorted set:
//! `s:<subject>` / `j:<jti>` → expiry, ms) and the channel `P orders`. Scripts read other
//! instances' hashes by name, so a fleet needs one Redis (or a replicated primary), not a
//! Redis Cluster.

use std::sync::LazyLock;

use redis::Script;

/// The handshake's one round trip. KEYS: instances, my hash, the address's rate key.
/// ARGV: my name, ip field (`""` = not capped), subject field (`""`), ip cap, subject cap,
/// the rate's emission interval (ms, 0 = off), its burst tolerance (ms), the hashes'
/// key prefix. Answers `{code, n}`: 0 admitted (and counted in my hash), 1 rate (`n` =
/// ms until allowed), 2 ip cap, 3 subject cap, 4 my registration is gone (counted
/// nothing: the instance re-registers and meanwhile follows `on_unavailable`).
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[2], '~') == 0 then return {4, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local step = tonumber(ARGV[6])
if step > 0 then
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  if tat < now then tat = now end
  local next_tat = tat + step
  local wait = next_tat - tonumber(ARGV[7]) - now
  if wait > 0 then return {1, wait} end
  redis.call('SET', KEYS[3], next_tat, 'PX', next_tat - now + 1)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local mine = false
for _, name in ipairs(live) do if name == ARGV[1] then mine = true end end
if not mine then table.insert(live, ARGV[1]) end
local function fleet_count(field)
  local n = 0
  for _, name in ipairs(live) do
    n = n + (tonumber(redis.call('HGET', ARGV[8] .. name, field) or '0') or 0)
  end
  return n
end
local ip_cap = tonumber(ARGV[4])
local sub_cap = tonumber(ARGV[5])
if ARGV[2] ~= '' and fleet_count(ARGV[2]) >= ip_cap then return {2, 0} end
if ARGV[3] ~= '' and fleet_count(ARGV[3]) >= sub_cap then return {3, 0} end
if ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
return {0, 0}
"#,
    )
});

/// Connections that ended. KEYS: my hash. ARGV: field, count, field, count, …
/// Answers 1, or 0 when my registration is gone (nothing changed: the instance
/// re-registers its whole truth).
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], '~') == 0 then return 0 end
for i = 1, #ARGV, 2 do
  local left = redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1]))
  if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"#,
    )
});

/// (Re-)registers this instance with the counts it holds now, replacing whatever Redis
/// held under its name (a restarted instance never double-counts; one that was cut off
/// brings Redis back to the truth). KEYS: instances, my hash. ARGV: my name, lease (ms),
/// field, count, …
pub static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], '~', 1)
local i = 3
while i <= #ARGV do
  local chunk = {}
  local last = math.min(#ARGV, i + 999)
  for j = i, last do chunk[#chunk + 1] = ARGV[j] end
  redis.call('HSET', KEYS[2], unpack(chunk))
  i = last + 1
end
redis.call('PEXPIRE', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
return 1
"#,
    )
});

/// The lease's renewal. KEYS: instances, my hash. ARGV: my name, lease (ms). Answers 1,
/// or 0 when my registration is gone (expired during a partition, or Redis lost its
/// data): the instance then re-registers. Drops instances whose lease ran out.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[2], '~') == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 1)
return 1
"#,
    )
});

/// A revocation stored with its expiry (a longer one already there is kept) and published.
/// KEYS: revoked, channel. ARGV: member, ttl (ms), the order's text.
pub static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') or 0
if cur < untl then redis.call('ZADD', KEYS[1], untl, ARGV[1]) end
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"#,
    )
});

/// A revocation lifted and published. KEYS: revoked, channel. ARGV: member, the order.
/// Answers whether an unexpired entry was there.
pub static LIFT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') or 0
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
if cur > now then return 1 end
return 0
"#,
    )
});

/// The revocations in force: expired ones dropped, then `{member, ms left, …}` for at
/// most ARGV[1] entries. KEYS: revoked.
pub static REVOKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local got = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #got, 2 do
  out[#out + 1] = got[i]
  out[#out + 1] = tostring(tonumber(got[i + 1]) - now)
end
return out
"#,
    )
});
