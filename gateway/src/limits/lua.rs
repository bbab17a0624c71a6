//! The Lua scripts of [`super::distributed`] (the same GCRA as [`super::gcra`] and the quota
//! checks of [`super::quota`], run atomically in Redis on Redis' clock) and how they are called:
//! key names written straight into the command ([`Name`]), `EVALSHA` commands sized once
//! ([`evalsha`]), replies of integers in one string ([`numbers`]).

use std::fmt;

use aihub_plans::Period;
use redis::Cmd;

use super::distributed::RedisDown;

/// What every script starts with: Redis' clock (µs), the window, and bucket-key expiry.
/// Numbers are integers (µs, units) held exactly in Lua's doubles.
pub(super) const PRELUDE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
-- A bucket hash lives until its fullest field is full again (never shortened).
local function extend(key, until_us)
  local ms = math.ceil((until_us - now) / 1000) + 1000
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"#;

/// Bucket functions of the admission and reservation scripts (after [`PRELUDE_LUA`]): `decide`
/// is [`super::gcra::decide`], `peek` a bucket's remaining units and reset, `tat` a bucket
/// field's theoretical arrival time, `numbers` the reply (integers in one string). A bucket
/// spec is `{key, field, rate, burst, cost, lenient}` (rate 0: not limited); `report` gives
/// each spec's `(limited, remaining, reset)` for the headers and `commit` stores the decisions.
pub(super) const BUCKETS_LUA: &str = r#"
local function decide(tat, rate, burst, cost, lenient)
  local T = math.ceil(W / rate)
  if lenient then cost = math.min(cost, rate) end
  local tau = burst * T
  local base = math.max(tat, now)
  local new = base + cost * T
  local over
  if lenient then over = base - now - (tau - T) else over = new - now - tau end
  if over <= 0 then
    local span, rem = tau - (new - now), 0
    if span > 0 then rem = math.floor(span / T) end
    return {true, new, rem, new - now}
  end
  return {false, tat, 0, over}
end
local function peek(tat, rate, burst)
  local T = math.ceil(W / rate)
  local used = math.max(tat - now, 0)
  local span, rem = burst * T - used, 0
  if span > 0 then rem = math.floor(span / T) end
  return rem, used
end
-- A reply of integers as one string ("0 12 -1 …"): one value for the client to parse.
local function numbers(r)
  for i, v in ipairs(r) do r[i] = string.format('%.0f', v) end
  return table.concat(r, ' ')
end
local function tat(key, field)
  local v = redis.call('HGET', key, field)
  if v then return tonumber(v) end
  return 0
end
-- A decision's numbers, or a bucket's current state when it was not decided or the request
-- was refused (nothing taken).
local function report(specs, results, status)
  local out = {}
  for i, s in ipairs(specs) do
    local d = results[i]
    if s[3] <= 0 then
      table.insert(out, -1); table.insert(out, 0); table.insert(out, 0)
    elseif d == nil or (status ~= 0 and d[1]) then
      local rem, reset = peek(tat(s[1], s[2]), s[3], s[4])
      table.insert(out, 1); table.insert(out, rem); table.insert(out, reset)
    else
      table.insert(out, 1); table.insert(out, d[3]); table.insert(out, d[4])
    end
  end
  return out
end
local function commit(specs, results)
  for i, s in ipairs(specs) do
    local d = results[i]
    if d ~= nil then
      redis.call('HSET', s[1], s[2], string.format('%.0f', d[2]))
      extend(s[1], d[2])
    end
  end
end
"#;

/// The admission script (after [`BUCKETS_LUA`]): [`super::gcra::decide`] for up to four
/// buckets plus the quota check. As the first of two steps (before the body is read) it takes
/// the request with no token cost; as the only step (the body read first) it also takes the
/// token reservation (`cost`) and checks that what the request declares fits a hard-stop quota,
/// as [`RESERVE_LUA`] would.
pub(super) const ADMIT_LUA: &str = r#"
local A = {}
for i = 1, #ARGV do A[i] = tonumber(ARGV[i]) end
-- A: 1 key req rate, 2 key req burst, 3 dev req rate, 4 dev req burst, 5 key tok rate,
--    6 dev tok rate, 7 cost, 8 quota mode (0 none, 1 track, 2 hard, 3 spend cap),
--    9 included, 10 spend cap, 11 reserved here, 12 seed tokens, 13 seed cost, 14 quota ttl s,
--    15 may create the quota hash from the seed (1) or must read a missing one as the seed (0),
--    16 tokens the request declares (0: not known yet, the first of two steps)
local qt, qc, status, retry = 0, 0, 0, 0
if A[8] >= 1 then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if A[15] == 1 then
      redis.call('HSET', KEYS[3], 'tokens', ARGV[12], 'cost', ARGV[13])
      redis.call('EXPIRE', KEYS[3], ARGV[14])
    end
    qt, qc = A[12], A[13]
  else
    qt = tonumber(redis.call('HGET', KEYS[3], 'tokens'))
    qc = tonumber(redis.call('HGET', KEYS[3], 'cost'))
  end
  local refuse = 0
  if A[8] == 2 and (qt + A[11] >= A[9] or qt + A[11] + A[16] > A[9]) then refuse = 5 end
  if A[8] == 3 and qt >= A[9] then
    local over = 0
    if qt > 0 then over = math.floor(qc * (qt - A[9]) / qt) end
    if over >= A[10] then refuse = 6 end
  end
  status = refuse
end
local specs = {
  {KEYS[1], 'r', A[1], A[2], 1, false},
  {KEYS[2], 'r', A[3], A[4], 1, false},
  {KEYS[1], 't', A[5], A[5], A[7], true},
  {KEYS[2], 't', A[6], A[6], A[7], true},
}
local results = {}
for i, s in ipairs(specs) do
  if s[3] > 0 and status < 5 then
    local d = decide(tat(s[1], s[2]), s[3], s[4], s[5], s[6])
    results[i] = d
    if not d[1] then
      if status == 0 then
        if i <= 2 then status = 1 else status = 2 end
      end
      retry = math.max(retry, d[4])
    end
  end
end
local out = report(specs, results, status)
if status == 0 then commit(specs, results) end
local r = {status, retry}
for _, v in ipairs(out) do table.insert(r, v) end
table.insert(r, qt); table.insert(r, qc)
return numbers(r)
"#;

/// The reservation script (after [`BUCKETS_LUA`]): the second step of an admission, once the
/// request's body is read. The token buckets decide again with the reservation as cost (as
/// [`super::gcra::decide`], leniently) and a hard-stop quota must fit the tokens the request
/// declares; refused, nothing is taken and the request the admission script took is given back.
pub(super) const RESERVE_LUA: &str = r#"
local A = {}
for i = 1, #ARGV do A[i] = tonumber(ARGV[i]) end
-- A: 1 key req rate, 2 dev req rate (given back on a refusal; 0 = none), 3 key tok rate,
--    4 dev tok rate, 5 cost, 6 hard quota (1/0), 7 included, 8 reserved here, 9 declared,
--    10 seed tokens (a missing quota hash reads as the seed)
local status, retry, qt = 0, 0, 0
if A[6] == 1 then
  local v = redis.call('HGET', KEYS[3], 'tokens')
  if v then qt = tonumber(v) else qt = A[10] end
  if qt + A[8] + A[9] > A[7] then status = 5 end
end
local specs = {
  {KEYS[1], 't', A[3], A[3], A[5], true},
  {KEYS[2], 't', A[4], A[4], A[5], true},
}
local results = {}
for i, s in ipairs(specs) do
  if s[3] > 0 and status == 0 then
    local d = decide(tat(s[1], s[2]), s[3], s[4], s[5], s[6])
    results[i] = d
    if not d[1] then
      status = 2
      retry = math.max(retry, d[4])
    end
  end
end
local out = report(specs, results, status)
if status == 0 then
  commit(specs, results)
else
  for i, key in ipairs({KEYS[1], KEYS[2]}) do
    local v = redis.call('HGET', key, 'r')
    if A[i] > 0 and v then
      local back = math.max(tonumber(v) - math.ceil(W / A[i]), now)
      redis.call('HSET', key, 'r', string.format('%.0f', back))
    end
  end
end
local r = {status, retry}
for _, v in ipairs(out) do table.insert(r, v) end
table.insert(r, qt)
return numbers(r)
"#;

/// The settle script, for one key and developer (the settles of a batch summed): token buckets
/// moved by their debts (real − reserved tokens, each request's counted at most one window, as
/// [`super::gcra::settle`]), quota counters increased.
pub(super) const SETTLE_LUA: &str = r#"
-- ARGV: 1 key tok rate, 2 dev tok rate, 3 key debt, 4 tokens, 5 cost, 6 track quota,
--       7 seed tokens, 8 seed cost, 9 quota ttl s, 10 may create the quota hash (1/0), 11 dev debt
local function adjust(key, rate, delta)
  if rate <= 0 then return end
  local v = redis.call('HGET', key, 't')
  -- Usage beyond the reservation is charged even if the bucket expired meanwhile.
  if delta == 0 or (not v and delta < 0) then return end
  local tat = math.max(math.max(tonumber(v or 0), now) + delta * math.ceil(W / rate), now)
  redis.call('HSET', key, 't', string.format('%.0f', tat))
  extend(key, tat)
end
adjust(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[3]))
adjust(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[11]))
if ARGV[6] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if ARGV[10] ~= '1' then return {2, 0, 0, 0} end
    redis.call('HSET', KEYS[3], 'tokens', ARGV[7], 'cost', ARGV[8])
    redis.call('EXPIRE', KEYS[3], ARGV[9])
  end
  local before = tonumber(redis.call('HGET', KEYS[3], 'tokens'))
  local after = redis.call('HINCRBY', KEYS[3], 'tokens', ARGV[4])
  local cost = redis.call('HINCRBY', KEYS[3], 'cost', ARGV[5])
  return {1, before, after, cost}
end
return {0, 0, 0, 0}
"#;

/// A Redis key name, written straight into the command being built (no `String` per call):
/// `{prefix}:{kind}:{id}`, or `{prefix}:q:{period}:{id}` for a quota hash.
pub(super) struct Name<'a> {
    pub prefix: &'a str,
    pub kind: &'static str,
    pub period: Option<Period>,
    pub id: &'a str,
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period {
            Some(p) => write!(f, "{}:{}:{p}:{}", self.prefix, self.kind, self.id),
            None => write!(f, "{}:{}:{}", self.prefix, self.kind, self.id),
        }
    }
}

impl redis::ToRedisArgs for Name<'_> {
    /// The name assembled in a stack buffer (no formatting machinery, no allocation unless
    /// it is unusually long).
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let month: [u8; 7];
        let period: &[u8] = match self.period {
            Some(p) if (0..10_000).contains(&p.year) && (1..=12).contains(&p.month) => {
                let (y, m) = (p.year as u32, p.month);
                month = [
                    b'0' + (y / 1000) as u8,
                    b'0' + (y / 100 % 10) as u8,
                    b'0' + (y / 10 % 10) as u8,
                    b'0' + (y % 10) as u8,
                    b'-',
                    b'0' + (m / 10) as u8,
                    b'0' + (m % 10) as u8,
                ];
                &month
            }
            Some(_) => return out.write_arg_fmt(self),
            None => &[],
        };
        let parts: [&[u8]; 4] = [
            self.prefix.as_bytes(),
            self.kind.as_bytes(),
            period,
            self.id.as_bytes(),
        ];
        let mut buf = [0u8; 192];
        let mut len = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            let end = len + usize::from(len > 0) + part.len();
            if end > buf.len() {
                return out.write_arg_fmt(self);
            }
            if len > 0 {
                buf[len] = b':';
                len += 1;
            }
            buf[len..end].copy_from_slice(part);
            len = end;
        }
        out.write_arg(&buf[..len])
    }
}

/// An `EVALSHA` command sized for our scripts' arguments (no regrowth while it is built).
pub(super) fn evalsha() -> Cmd {
    let mut cmd = Cmd::with_capacity(24, 512);
    cmd.arg("EVALSHA");
    cmd
}

/// A script's reply: integers in one string (see `numbers` in [`super::lua`]).
pub(super) fn numbers(v: redis::Value) -> Result<Vec<i64>, RedisDown> {
    let bad = || {
        RedisDown::Redis(redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected script reply",
        )))
    };
    let redis::Value::BulkString(bytes) = v else {
        return Err(bad());
    };
    let mut out = Vec::with_capacity(20);
    for n in bytes.split(|&b| b == b' ') {
        let (negative, digits) = match n.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, n),
        };
        if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let v = digits
            .iter()
            .fold(0i64, |v, d| v * 10 + i64::from(d - b'0'));
        out.push(if negative { -v } else { v });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_and_script_replies() {
        let name = Name {
            prefix: "aihub",
            kind: "rl:k",
            period: None,
            id: "key_1",
        };
        assert_eq!(name.to_string(), "aihub:rl:k:key_1");
        let quota = Name {
            period: Some(Period::of_unix_ms(0)),
            kind: "q",
            id: "dev_1",
            ..name
        };
        assert_eq!(quota.to_string(), "aihub:q:1970-01:dev_1");
        let written = |n: &Name| {
            let mut cmd = Cmd::new();
            cmd.arg(n);
            cmd.args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => String::from_utf8(b.to_vec()).unwrap(),
                    redis::Arg::Cursor => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(written(&name), ["aihub:rl:k:key_1"]);
        assert_eq!(written(&quota), ["aihub:q:1970-01:dev_1"]);
        let long = "k".repeat(300);
        let long_name = Name { id: &long, ..name };
        assert_eq!(written(&long_name), [format!("aihub:rl:k:{long}")]);
        let reply = redis::Value::BulkString(b"0 12 -1 1796504631494098".to_vec());
        assert_eq!(numbers(reply).unwrap(), [0, 12, -1, 1_796_504_631_494_098]);
        assert!(numbers(redis::Value::Int(3)).is_err());
        assert!(numbers(redis::Value::BulkString(b"1 x".to_vec())).is_err());
    }
}
