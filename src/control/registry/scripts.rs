//! Lua scripts for atomic ownership changes. Plain EVAL/EVALSHA scripts run
//! on Valkey and on Redis 7 alike; they are loaded again after every
//! reconnect, since a promoted replica has an empty script cache.
//!
//! A session value is `owner|epoch|upstream`; owner "" means released.

/// Claim an existing session for ARGV[1], or say who owns it. (A new
/// session is claimed without a script: `SET NX GET` with the session id
/// added to the node's set in the same pipeline; this script runs when
/// that found a value, and takes the speculative set entry back out when
/// the session stays another node's.)
/// KEYS: session, my node-sessions set. ARGV: me, node key prefix,
/// session id, allow takeover ("1"/"0"), the upstream this node would
/// open (recorded when the session has none yet), "1" when the session id
/// was added to my set speculatively.
/// A session found in the registry but owned by no live node — its owner
/// gone, or the session released by a dead node's collection or a drain —
/// is a takeover: it moves here from another node.
/// Returns {verdict, epoch, upstream, detail}: verdict is new | takeover |
/// mine | owned (detail = owner's node record) | wait (owner not live, but
/// takeovers are on hold).
pub const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
local owner, epoch, up = '', 0, ''
if v then
  local a, b, c = string.match(v, '^([^|]*)|(%d+)|(.*)$')
  owner, epoch, up = a or '', tonumber(b) or 0, c or ''
end
if owner == ARGV[1] then
  return {'mine', epoch, up, ''}
end
if owner ~= '' then
  local node = redis.call('GET', ARGV[2] .. owner)
  if node or ARGV[4] ~= '1' then
    if ARGV[6] == '1' then redis.call('SREM', KEYS[2], ARGV[3]) end
    if node then return {'owned', epoch, up, node} end
    return {'wait', epoch, up, owner}
  end
end
epoch = epoch + 1
if up == '' then up = ARGV[5] end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch .. '|' .. up)
redis.call('SADD', KEYS[2], ARGV[3])
if v then
  return {'takeover', epoch, up, owner}
end
return {'new', epoch, up, ''}
"#;

/// Raise the epoch of a session this node owns in the registry but not in
/// memory (a restart under the same id). KEYS: session, node set.
/// ARGV: me, epoch seen, session id. Returns the new epoch or 0.
pub const BUMP: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local a, b, c = string.match(v, '^([^|]*)|(%d+)|(.*)$')
if a ~= ARGV[1] or b ~= ARGV[2] then return 0 end
local epoch = tonumber(b) + 1
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch .. '|' .. c)
redis.call('SADD', KEYS[2], ARGV[3])
return epoch
"#;

/// Record the upstream of a session this node owns at this epoch.
/// KEYS: session. ARGV: me, epoch, upstream.
pub const SET_UPSTREAM: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local a, b = string.match(v, '^([^|]*)|(%d+)|')
if a ~= ARGV[1] or b ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
return 1
"#;

/// The session ended: delete it if this node still owns it at this epoch.
/// KEYS: session, node set. ARGV: me, epoch, session id.
pub const END: &str = r#"
redis.call('SREM', KEYS[2], ARGV[3])
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local a, b = string.match(v, '^([^|]*)|(%d+)|')
if a ~= ARGV[1] or b ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// Release a session (owner ""), keeping epoch and upstream for ARGV[3] ms,
/// unless the owner is registered (it came back: its sessions stay its own)
/// and ARGV[5] is not "1" (a new process under the owner's id releasing
/// what an earlier one left). KEYS: session, owner's node set, owner's node
/// key. ARGV: owner, epoch ("" = any), ttl ms, session id, "1" or "0".
pub const RELEASE: &str = r#"
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('SREM', KEYS[2], ARGV[4])
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local a, b, c = string.match(v, '^([^|]*)|(%d+)|(.*)$')
if a ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and b ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], '|' .. b .. '|' .. c, 'PX', ARGV[3])
return 1
"#;

/// After a reconnect, restate a session this node holds. KEYS: session,
/// node set. ARGV: me, epoch, upstream, session id. Returns 1 when the
/// session is (again) this node's, 0 when another owner has a higher or
/// equal epoch: that copy wins, this one must close.
pub const ASSERT: &str = r#"
local v = redis.call('GET', KEYS[1])
local mine = tonumber(ARGV[2])
if v then
  local a, b = string.match(v, '^([^|]*)|(%d+)|')
  local cur = tonumber(b) or 0
  if a == ARGV[1] then
    if cur > mine then return 0 end
  elseif a == '' then
    if cur > mine then return 0 end
  elseif cur >= mine then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"#;

/// Refresh this node's registration if it is still the one written by this
/// process, and (re)state its membership. KEYS: node key, member set.
/// ARGV: record, ttl ms, node id. Returns 1 when refreshed, 0 when it had
/// lapsed (expired or lost) and was written anew, -1 when another process
/// holds the id.
pub const HEARTBEAT: &str = r#"
redis.call('SADD', KEYS[2], ARGV[3])
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if v then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 0
"#;

/// Forget a dead node, unless it came back meanwhile. KEYS: node key,
/// node set, member set. ARGV: node id.
pub const FORGET: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"#;
