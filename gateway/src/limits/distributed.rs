//! Limits shared by every gateway node through Redis.
//!
//! **Design: the decision is made in Redis.** A Lua script (`lua.rs`) runs the same GCRA
//! as [`super::gcra`] against the key's and the developer's buckets and checks the developer's
//! period quota, atomically, on Redis' clock (`TIME`), and commits all buckets or none. So the
//! global limits hold exactly across nodes (no over-admission from coordination); the price is
//! a Redis round trip per limited request (measured in `loadtests/results/limits-latest.md`):
//! - **one** for the usual request, whose small body is announced (`Content-Length` up to
//!   [`super::ONE_STEP_BODY_MAX`]): the body is read first and one script takes the request,
//!   the token reservation and checks the quota against what the request declares
//!   ([`super::Limits::admit_whole`]);
//! - **two** for a large or chunked body when tokens or a hard-stop quota are limited: the
//!   admission script runs before the body is read (requests taken, tokens and quota checked
//!   with no cost of its own, so a key at its limit is refused without its body being read),
//!   the reservation script once it is read (tokens taken, the quota must fit the request; a
//!   refusal gives back the request the first script took, in the same script).
//!
//! Settling (real tokens, quota counters) runs after the response, off the request's path and
//! in batches ([`super::settler`]): one script call per key and batch, one pipeline per batch.
//!
//! **CPU per call.** The request path's calls go through a lane (`lane.rs`) on a connection
//! driven by the runtime that serves the requests (no thread is woken for a decision), and the
//! calls of the requests that reach their admission in the same scheduler round leave as one
//! pipeline (one write and one read for all of them). Key names are written straight into the
//! command, and the scripts answer with one string of integers instead of an array.
//!
//! Quota counters live in one hash per developer and period. A missing hash (first use, or a
//! Redis that lost its data) is created from the node's own totals (ClickHouse seed plus what
//! it counted), so a Redis restart does not reset anybody's quota. Reservations of requests in
//! flight stay on their node: with several nodes a quota edge can be overshot by the other
//! nodes' reservations at most.
//!
//! **Outages.** A failed or slow (`limits.redis.timeout`) call marks Redis down: the node logs
//! once, sets `aihub_limits_redis_up` to 0 and decides locally with its share of each limit
//! (limit ÷ live nodes, from the node registry below); the request whose call failed is decided
//! there too (in two steps, as without Redis), and settles that cannot reach Redis count their
//! quota usage for later. A monitor reconnects every second; when Redis answers again, quota
//! usage counted meanwhile is added to Redis and decisions move back.
//!
//! **Node registry.** Every node refreshes its entry in a sorted set each second; nodes seen in
//! the last 5 s are live. The count survives outages (last known value).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aihub_net::redis::RedisTarget;
use aihub_plans::Period;
use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{Cmd, Script};

use super::gcra::Rate;
use super::headers::{RateHeaders, Shown};
use super::lane::{Failed, Lane};
use super::local::{Rates, Refused};
use super::lua::{
    evalsha, numbers, Name, ADMIT_LUA, BUCKETS_LUA, PRELUDE_LUA, RESERVE_LUA, SETTLE_LUA,
};
use super::quota::QuotaRule;
use crate::error::Reason;

/// Nodes that refreshed their registry entry within this window are live.
const NODE_TTL_MS: i64 = 5_000;

/// Errors talking to Redis (the caller falls back to local limits).
#[derive(Debug, thiserror::Error)]
pub enum RedisDown {
    #[error("not connected")]
    NotConnected,
    #[error("the settle queue is full")]
    QueueFull,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(Arc<str>),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// What the quota part of a request sends to Redis.
#[derive(Debug, Clone, Copy)]
pub struct QuotaArgs {
    pub rule: Option<QuotaRule>,
    /// Tokens reserved by this node's requests in flight for the developer.
    pub reserved: u64,
    /// This node's totals: the hash's content if Redis has none.
    pub seed: (u64, i64),
    /// The current period and its end (unix ms).
    pub period: Period,
    pub period_end_ms: i64,
    /// This node's totals include the period's usage from ClickHouse, so a missing quota hash
    /// may be created from them (else it is read as `seed` without being created).
    pub seeded: bool,
}

/// What the reservation step sends to Redis about the quota and the request to give back.
#[derive(Debug, Clone, Copy)]
pub struct ReserveArgs {
    /// The request buckets the admission script took from (given back on a refusal); empty
    /// when that step was decided elsewhere.
    pub give_back: Rates,
    /// A hard-stop quota's included tokens.
    pub hard_included: Option<u64>,
    /// Tokens reserved by this node's other requests in flight for the developer.
    pub reserved: u64,
    /// The tokens the request itself declares (must fit what is left of a hard-stop quota).
    pub declared: u64,
    /// This node's committed tokens: what a missing quota hash is read as.
    pub seed: u64,
    pub period: Period,
}

/// A Redis reservation: the decision (tokens shown) and the developer's global committed
/// tokens (when a hard-stop quota was checked).
pub struct RemoteReservation {
    pub result: Result<Option<Shown>, Refused>,
    pub quota_tokens: Option<u64>,
}

/// A Redis admission: the decision and the developer's global totals (when tracked).
pub struct RemoteAdmission {
    pub result: Result<RateHeaders, Refused>,
    pub quota: Option<(u64, i64)>,
}

/// The quota a settle counts against.
#[derive(Debug, Clone, Copy)]
pub struct Track {
    pub period: Period,
    /// The node's totals before this usage (the hash's content if Redis has none).
    pub seed: (u64, i64),
    /// The node's totals include ClickHouse's: a missing hash may be created from them.
    pub seeded: bool,
}

/// What a settle did to the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Counted: the global totals.
    Counted(Settled),
    /// No quota tracked for this request.
    Untracked,
    /// Redis has no counter yet and this node may not create it (its ClickHouse seed has not
    /// arrived): the caller keeps the usage for later.
    NotSeeded,
}

/// A settle (one request's, or the sum of a batch's for one key): its buckets, what they owe,
/// real usage, its quota.
#[derive(Debug, Clone)]
pub struct SettleArgs {
    pub key_id: Arc<str>,
    pub dev_id: Arc<str>,
    pub rates: Rates,
    /// Tokens the key's and the developer's token buckets owe: real − reserved, each
    /// request's counted at most one window ([`SettleArgs::debts`]); negative gives back.
    pub debt: (i64, i64),
    /// Real tokens and cost (nano-USD).
    pub usage: (u64, i64),
    pub track: Option<Track>,
}

impl SettleArgs {
    /// What a request that reserved `reserved` tokens and used `used` owes each token bucket.
    pub fn debts(rates: &Rates, reserved: u64, used: u64) -> (i64, i64) {
        let owed = |r: Option<Rate>| {
            r.map_or(0, |r| {
                super::gcra::window_units(r, used) as i64
                    - super::gcra::window_units(r, reserved) as i64
            })
        };
        (owed(rates.key_tokens), owed(rates.dev_tokens))
    }
}

/// The request path's connection may take this long to connect (off the request path).
const LANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A batch of settles may take this long (off the request path).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

fn settle_outcome(r: &[i64]) -> SettleOutcome {
    match (r.first(), r.len()) {
        (Some(1), 4) => SettleOutcome::Counted(Settled {
            before: r[1].max(0) as u64,
            after: r[2].max(0) as u64,
            cost: r[3],
        }),
        (Some(2), _) => SettleOutcome::NotSeeded,
        _ => SettleOutcome::Untracked,
    }
}

/// Quota totals after a settle: tokens before and after, cost after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub before: u64,
    pub after: u64,
    pub cost: i64,
}

/// Usage counted while Redis was down: (tokens, cost) by period and developer.
type Deferred = HashMap<(Period, Arc<str>), (u64, i64)>;

/// The Redis side of the limiter.
pub struct Distributed {
    redis: RedisTarget,
    /// The connection of the background work (monitor, settles), driven on its runtime.
    conn: ArcSwapOption<MultiplexedConnection>,
    /// The request path's calls, batched on a connection driven by the runtime that serves the
    /// requests ([`Distributed::adopt_runtime`], [`super::lane`]): a decision never wakes
    /// another thread. Until that runtime is known, requests use `conn`.
    lane: ArcSwapOption<Lane>,
    /// The runtime serving requests (the first one that asked for a decision).
    home: OnceLock<tokio::runtime::Handle>,
    lane_connecting: tokio::sync::Mutex<()>,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    nodes: AtomicU32,
    node_id: String,
    admit: Script,
    reserve: Script,
    settle: Script,
    /// Quota usage counted while Redis was down, by period and developer: (tokens, cost).
    pending: Mutex<Deferred>,
}

impl Distributed {
    /// Prepares the client (no I/O: the monitor connects).
    pub fn new(redis: RedisTarget, prefix: &str, timeout: Duration) -> Distributed {
        Distributed {
            redis,
            conn: ArcSwapOption::empty(),
            lane: ArcSwapOption::empty(),
            home: OnceLock::new(),
            lane_connecting: tokio::sync::Mutex::new(()),
            prefix: prefix.to_owned(),
            timeout,
            up: AtomicBool::new(false),
            nodes: AtomicU32::new(1),
            node_id: uuid::Uuid::now_v7().simple().to_string(),
            admit: Script::new(&format!("{PRELUDE_LUA}{BUCKETS_LUA}{ADMIT_LUA}")),
            reserve: Script::new(&format!("{PRELUDE_LUA}{BUCKETS_LUA}{RESERVE_LUA}")),
            settle: Script::new(&format!("{PRELUDE_LUA}{SETTLE_LUA}")),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Whether decisions currently go to Redis.
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Live gateway nodes (last known; at least 1).
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    fn key<'a>(&'a self, kind: &'static str, id: &'a str) -> Name<'a> {
        Name {
            prefix: &self.prefix,
            kind,
            period: None,
            id,
        }
    }

    fn quota_key<'a>(&'a self, period: Period, dev_id: &'a str) -> Name<'a> {
        Name {
            prefix: &self.prefix,
            kind: "q",
            period: Some(period),
            id: dev_id,
        }
    }

    /// `EVALSHA` of `script` on its three keys: the key's and the developer's buckets and the
    /// developer's quota hash for `period` (the arguments follow).
    fn script_call(&self, script: &Script, (key_id, dev_id): (&str, &str), period: Period) -> Cmd {
        let mut cmd = evalsha();
        cmd.arg(script.get_hash())
            .arg(3)
            .arg(self.key("rl:k", key_id))
            .arg(self.key("rl:d", dev_id))
            .arg(self.quota_key(period, dev_id));
        cmd
    }

    fn connection(&self) -> Result<MultiplexedConnection, RedisDown> {
        self.conn
            .load()
            .as_deref()
            .cloned()
            .ok_or(RedisDown::NotConnected)
    }

    /// A script call of the request path (built by `build`): through the lane, else (its
    /// runtime not known yet) on the background connection.
    async fn request(
        &self,
        script: &Script,
        build: impl Fn() -> Cmd,
    ) -> Result<Vec<i64>, RedisDown> {
        for attempt in 0..2 {
            let queued = self.lane.load().as_deref().map(|lane| lane.call(build()));
            let Some(answer) = queued else {
                let mut conn = self.connection()?;
                return self.eval(&mut conn, script, &build).await;
            };
            let value = match answer.await {
                Ok(Ok(v)) => v,
                Ok(Err(Failed::Timeout)) => return Err(RedisDown::Timeout(self.timeout)),
                Ok(Err(Failed::Connection(why))) => return Err(RedisDown::Failed(why)),
                Err(_) => return Err(RedisDown::NotConnected),
            };
            match value.extract_error() {
                Ok(v) => return numbers(v),
                // Redis lost its scripts (a restart, a flush): load it, send again.
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError && attempt == 0 => {
                    let mut conn = self.connection()?;
                    self.timed(script.prepare_invoke().load_async(&mut conn))
                        .await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(RedisDown::NotConnected)
    }

    /// Notes the runtime serving requests (called on the request path; a load once known) and
    /// connects the lane on it (the monitor reconnects it after an outage).
    #[inline]
    pub fn adopt_runtime(self: &Arc<Self>) {
        if self.home.get().is_none() {
            self.adopt_slow();
        }
    }

    #[cold]
    fn adopt_slow(self: &Arc<Self>) {
        let Ok(h) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.home.set(h.clone()).is_ok() {
            let me = Arc::clone(self);
            h.spawn(async move {
                if let Some(home) = me.home.get() {
                    me.connect_lane(home).await;
                }
            });
        }
    }

    /// Connects the request path's lane on `home` unless there is one. Until it is connected
    /// (a busy runtime may take a while) requests use `conn`.
    async fn connect_lane(&self, home: &tokio::runtime::Handle) {
        let _one_at_a_time = self.lane_connecting.lock().await;
        if self.lane.load().is_some() {
            return;
        }
        match self.connect_on(home).await {
            Ok(c) => {
                let (lane, task) = Lane::start(c, self.timeout);
                home.spawn(task);
                self.lane.store(Some(lane));
            }
            Err(e) => {
                tracing::debug!(error = %e, "the request path's Redis connection is not ready yet")
            }
        }
    }

    /// A connection whose driver task runs on `home`.
    async fn connect_on(
        &self,
        home: &tokio::runtime::Handle,
    ) -> Result<MultiplexedConnection, RedisDown> {
        let redis = self.redis.clone();
        let task = home.spawn(async move { redis.multiplexed().await });
        match tokio::time::timeout(LANE_CONNECT_TIMEOUT, task).await {
            Err(_) => Err(RedisDown::Timeout(LANE_CONNECT_TIMEOUT)),
            Ok(Err(e)) => Err(RedisDown::Failed(e.to_string().into())),
            Ok(Ok(c)) => Ok(c?),
        }
    }

    /// Sends a script call built by `build` (`EVALSHA`), loading the script first if Redis
    /// does not have it (a restart, a flush).
    async fn eval(
        &self,
        conn: &mut MultiplexedConnection,
        script: &Script,
        build: &impl Fn() -> Cmd,
    ) -> Result<Vec<i64>, RedisDown> {
        let sent = match self.timed(build().query_async(conn)).await {
            Err(RedisDown::Redis(e)) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.timed(script.prepare_invoke().load_async(conn)).await?;
                self.timed(build().query_async(conn)).await
            }
            r => r,
        };
        numbers(sent?)
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisDown> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisDown::Timeout(self.timeout)),
        }
    }

    /// Marks Redis down; true the first time (the caller logs once).
    pub fn mark_down(&self) -> bool {
        self.up.swap(false, Ordering::Relaxed)
    }

    /// Runs the admission script. `cost`: the token reservation and the tokens the request
    /// declares, both 0 before its body is read (the first of two steps); known, the script is
    /// the whole admission (the reservation taken, a hard-stop quota checked against them).
    pub async fn admit(
        &self,
        (key_id, dev_id): (&str, &str),
        rates: &Rates,
        (cost, declared): (u64, u64),
        quota: QuotaArgs,
    ) -> Result<RemoteAdmission, RedisDown> {
        let rate = |r: Option<Rate>| r.map_or((0, 0), |r| (r.per_minute, r.burst));
        let (kr, kb) = rate(rates.key_requests);
        let (dr, db) = rate(rates.dev_requests);
        let (mode, included, cap) = match quota.rule {
            None => (0, 0, 0),
            Some(r) if r.hard && r.included.is_some() => (2, r.included.unwrap_or(0), 0),
            // Without included tokens nothing is overage: the cap cannot bind (as locally).
            Some(r) if !r.hard && r.spend_cap_nanos.is_some() && r.included.is_some() => {
                (3, r.included.unwrap_or(0), r.spend_cap_nanos.unwrap_or(0))
            }
            Some(_) => (1, 0, 0),
        };
        let ttl = quota_ttl_secs(quota.period_end_ms);
        let build = || {
            let mut cmd = self.script_call(&self.admit, (key_id, dev_id), quota.period);
            cmd.arg(kr)
                .arg(kb)
                .arg(dr)
                .arg(db)
                .arg(rates.key_tokens.map_or(0, |r| r.per_minute))
                .arg(rates.dev_tokens.map_or(0, |r| r.per_minute))
                .arg(cost)
                .arg(mode)
                .arg(included)
                .arg(cap)
                .arg(quota.reserved)
                .arg(quota.seed.0)
                .arg(quota.seed.1)
                .arg(ttl)
                .arg(u8::from(quota.seeded))
                .arg(declared);
            cmd
        };
        let r = self.request(&self.admit, build).await?;
        if r.len() != 16 {
            return Err(RedisDown::Redis(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected admission reply",
            ))));
        }
        let quota_totals = (mode > 0).then(|| (r[14].max(0) as u64, r[15]));
        let bucket = |i: usize, rate: Option<Rate>| -> Option<Shown> {
            let base = 2 + 3 * i;
            (r[base] == 1).then(|| Shown {
                limit: rate.map_or(0, |r| r.per_minute),
                remaining: r[base + 1].max(0) as u64,
                reset_us: r[base + 2],
            })
        };
        let headers = RateHeaders {
            requests: Shown::tighter(bucket(0, rates.key_requests), bucket(1, rates.dev_requests)),
            tokens: Shown::tighter(bucket(2, rates.key_tokens), bucket(3, rates.dev_tokens)),
        };
        let result = match r[0] {
            0 => Ok(headers),
            status => Err(Refused {
                reason: match status {
                    1 => Reason::Requests,
                    2 => Reason::Tokens,
                    5 => Reason::Quota,
                    _ => Reason::SpendCap,
                },
                retry_us: r[1],
                headers,
            }),
        };
        Ok(RemoteAdmission {
            result,
            quota: quota_totals,
        })
    }

    /// Runs the reservation script: takes `cost` tokens from the key's and the developer's
    /// token buckets (`rates`), checks a hard-stop quota against the request's declared tokens,
    /// and on a refusal gives back the request taken by [`Distributed::admit`].
    pub async fn reserve(
        &self,
        (key_id, dev_id): (&str, &str),
        rates: &Rates,
        cost: u64,
        q: ReserveArgs,
    ) -> Result<RemoteReservation, RedisDown> {
        let per_minute = |r: Option<Rate>| r.map_or(0, |r| r.per_minute);
        let build = || {
            let mut cmd = self.script_call(&self.reserve, (key_id, dev_id), q.period);
            cmd.arg(per_minute(q.give_back.key_requests))
                .arg(per_minute(q.give_back.dev_requests))
                .arg(per_minute(rates.key_tokens))
                .arg(per_minute(rates.dev_tokens))
                .arg(cost)
                .arg(u8::from(q.hard_included.is_some()))
                .arg(q.hard_included.unwrap_or(0))
                .arg(q.reserved)
                .arg(q.declared)
                .arg(q.seed);
            cmd
        };
        let r = self.request(&self.reserve, build).await?;
        if r.len() != 9 {
            return Err(RedisDown::Redis(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected reservation reply",
            ))));
        }
        let bucket = |i: usize, rate: Option<Rate>| -> Option<Shown> {
            let base = 2 + 3 * i;
            (r[base] == 1).then(|| Shown {
                limit: rate.map_or(0, |r| r.per_minute),
                remaining: r[base + 1].max(0) as u64,
                reset_us: r[base + 2],
            })
        };
        let tokens = Shown::tighter(bucket(0, rates.key_tokens), bucket(1, rates.dev_tokens));
        let result = match r[0] {
            0 => Ok(tokens),
            status => Err(Refused {
                reason: if status == 5 {
                    Reason::Quota
                } else {
                    Reason::Tokens
                },
                retry_us: r[1],
                headers: RateHeaders {
                    requests: None,
                    tokens,
                },
            }),
        };
        Ok(RemoteReservation {
            result,
            quota_tokens: q.hard_included.map(|_| r[8].max(0) as u64),
        })
    }

    /// Runs the settle script for a batch in one pipeline (one round trip). Settles that found
    /// Redis without its scripts (a restart) are sent again once they are loaded.
    pub async fn settle_batch(&self, jobs: &[SettleArgs]) -> Result<Vec<SettleOutcome>, RedisDown> {
        let mut conn = self.connection()?;
        let mut outcomes = vec![None; jobs.len()];
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            let mut sent = Vec::with_capacity(jobs.len());
            for (i, j) in jobs.iter().enumerate() {
                if outcomes[i].is_none() {
                    pipe.add_command(self.settle_cmd(j));
                    sent.push(i);
                }
            }
            let answer = conn.send_packed_commands(&pipe, 0, sent.len());
            let rows = match tokio::time::timeout(SETTLE_TIMEOUT, answer).await {
                Err(_) => return Err(RedisDown::Timeout(SETTLE_TIMEOUT)),
                Ok(r) => r?,
            };
            if rows.len() != sent.len() {
                return Err(RedisDown::NotConnected);
            }
            let mut lost_scripts = false;
            for (i, row) in sent.into_iter().zip(rows) {
                match row.extract_error() {
                    Ok(v) => {
                        let row: Vec<i64> = redis::from_owned_redis_value(v)?;
                        outcomes[i] = Some(settle_outcome(&row));
                    }
                    Err(e) if e.kind() == redis::ErrorKind::NoScriptError && attempt == 0 => {
                        lost_scripts = true
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !lost_scripts {
                break;
            }
            self.timed(self.settle.prepare_invoke().load_async(&mut conn))
                .await?;
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or(RedisDown::NotConnected))
            .collect()
    }

    /// One request's settle as an `EVALSHA` command.
    fn settle_cmd(&self, j: &SettleArgs) -> redis::Cmd {
        let t = j.track.unwrap_or(Track {
            period: Period::of_unix_ms(0),
            seed: (0, 0),
            seeded: false,
        });
        let mut cmd = self.script_call(&self.settle, (&j.key_id, &j.dev_id), t.period);
        cmd.arg(j.rates.key_tokens.map_or(0, |r| r.per_minute))
            .arg(j.rates.dev_tokens.map_or(0, |r| r.per_minute))
            .arg(j.debt.0)
            .arg(j.usage.0)
            .arg(j.usage.1)
            .arg(u8::from(j.track.is_some()))
            .arg(t.seed.0)
            .arg(t.seed.1)
            .arg(quota_ttl_secs(t.period.end_ms()))
            .arg(u8::from(t.seeded))
            .arg(j.debt.1);
        cmd
    }

    /// Remembers quota usage that could not reach Redis.
    pub fn defer(&self, period: Period, dev_id: &Arc<str>, tokens: u64, cost: i64) {
        let mut p = self.pending.lock().expect("pending lock");
        let e = p.entry((period, Arc::clone(dev_id))).or_default();
        e.0 += tokens;
        e.1 += cost;
    }

    /// One monitor round: connect if needed, refresh the node registry, hand over deferred
    /// usage. Returns whether Redis is up, and whether it just came back.
    pub async fn monitor_once(
        &self,
        totals: impl Fn(Period, &str) -> (u64, i64),
        seeded: bool,
    ) -> Result<bool, RedisDown> {
        let reconnect = !self.is_up() || self.conn.load().is_none();
        let mut conn = match self.connection() {
            Ok(c) if !reconnect => c,
            _ => {
                let c = self.timed(self.redis.multiplexed()).await?;
                self.conn.store(Some(Arc::new(c.clone())));
                c
            }
        };
        if reconnect {
            if let Some(old) = self.lane.swap(None) {
                old.close();
            }
        }
        if let Some(home) = self.home.get() {
            self.connect_lane(home).await;
        }
        let now_ms = crate::clock::now_ms() as i64;
        let nodes_key = self.key("nodes", "live");
        let (_, _, count, _): ((), (), u32, ()) = self
            .timed(
                redis::pipe()
                    .zadd(&nodes_key, &self.node_id, now_ms)
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&nodes_key)
                    .arg("-inf")
                    .arg(now_ms - NODE_TTL_MS)
                    .zcard(&nodes_key)
                    .pexpire(&nodes_key, NODE_TTL_MS * 2)
                    .query_async(&mut conn),
            )
            .await?;
        self.nodes.store(count.max(1), Ordering::Relaxed);
        let pending: Vec<_> = std::mem::take(&mut *self.pending.lock().expect("pending lock"))
            .into_iter()
            .collect();
        for (i, ((period, dev), (tokens, cost))) in pending.iter().enumerate() {
            let (t, c) = totals(*period, dev);
            let track = Track {
                period: *period,
                seed: (t.saturating_sub(*tokens), c - cost),
                seeded,
            };
            let job = SettleArgs {
                key_id: "".into(),
                dev_id: Arc::clone(dev),
                rates: Rates::default(),
                debt: (0, 0),
                usage: (*tokens, *cost),
                track: Some(track),
            };
            match self.settle_batch(std::slice::from_ref(&job)).await {
                Ok(o) if o.first() == Some(&SettleOutcome::NotSeeded) => {
                    self.defer(*period, dev, *tokens, *cost)
                }
                Ok(_) => {}
                Err(e) => {
                    for ((p, d), (t, c)) in &pending[i..] {
                        self.defer(*p, d, *t, *c);
                    }
                    return Err(e);
                }
            }
        }
        let came_back = !self.up.swap(true, Ordering::Relaxed);
        Ok(came_back)
    }

    /// Leaves the node registry (at shutdown).
    pub async fn leave(&self) {
        if let Ok(mut conn) = self.connection() {
            let _: Result<(), _> = self
                .timed(
                    redis::cmd("ZREM")
                        .arg(self.key("nodes", "live"))
                        .arg(&self.node_id)
                        .query_async(&mut conn),
                )
                .await;
        }
    }
}

/// Quota hashes outlive their period by 35 days (invoices may still look at them).
fn quota_ttl_secs(period_end_ms: i64) -> i64 {
    let left = (period_end_ms - crate::clock::now_ms() as i64).max(0) / 1000;
    left + 35 * 86_400
}
