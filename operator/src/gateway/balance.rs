//! Which pod gets a request: the fewest requests in flight through this gateway, or, in
//! prefix-affinity mode, the pod a prompt's prefix hashes to unless it carries more than
//! its share (consistent hashing with bounded loads, as KubeAI's PrefixHash), so requests
//! that share a system prompt find its KV cache where it was filled.
use axum::http::HeaderValue;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Routing {
    /// The ready pod with the fewest requests in flight.
    LeastInFlight,
    /// The same prompt prefix to the same pod, within a load bound.
    PrefixAffinity,
}

/// Requests in flight per pod, counted by this gateway.
#[derive(Default)]
pub struct Balancer {
    /// By pod address, from the API server, not from callers: foldhash, not SipHash.
    pods: RwLock<HashMap<SocketAddr, Arc<Pod>, foldhash::fast::RandomState>>,
    /// Rotates the starting point among equally loaded pods.
    turn: AtomicUsize,
}

/// What the gateway keeps per pod: its load, and its address as a `Host` header, written
/// once rather than formatted again for every request.
struct Pod {
    in_flight: AtomicUsize,
    host: HeaderValue,
}

impl Pod {
    fn new(addr: SocketAddr) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            host: HeaderValue::try_from(addr.to_string())
                .expect("a socket address is a header value"),
        }
    }
}

/// One request's place on a pod: counted until dropped (when its response ends).
pub struct Slot {
    pod: Arc<Pod>,
    pub addr: SocketAddr,
}

impl Slot {
    pub fn host(&self) -> &HeaderValue {
        &self.pod.host
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pod.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Balancer {
    /// A slot on the pod chosen among `endpoints` minus `tried`; `None` when none is left.
    /// `prefix` is the request's prompt prefix in affinity mode; `load_factor` bounds how
    /// far above the mean load an affine pod may go before the next one is taken.
    pub fn pick(
        &self,
        endpoints: &[SocketAddr],
        tried: &[SocketAddr],
        prefix: Option<&[u8]>,
        load_factor: f64,
    ) -> Option<Slot> {
        let candidates = || endpoints.iter().copied().filter(|e| !tried.contains(e));
        // Every request looks its pods up, under a read lock the serving threads share; a
        // pod not seen before (no load yet) is added once, under the write lock.
        let (addr, known) = {
            let pods = read(&self.pods);
            let load = |addr: &SocketAddr| {
                pods.get(addr)
                    .map_or(0, |p| p.in_flight.load(Ordering::Acquire))
            };
            let addr = match prefix {
                Some(prefix) => {
                    affine(&candidates().collect::<Vec<_>>(), load, prefix, load_factor)
                }
                None => least(
                    candidates(),
                    load,
                    self.turn.fetch_add(1, Ordering::Relaxed),
                ),
            }?;
            (addr, pods.get(&addr).cloned())
        };
        let pod = known.unwrap_or_else(|| {
            let mut pods = self.pods.write().unwrap_or_else(PoisonError::into_inner);
            pods.entry(addr)
                .or_insert_with(|| Arc::new(Pod::new(addr)))
                .clone()
        });
        pod.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Slot { pod, addr })
    }

    /// Requests in flight on `addr` through this gateway.
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        read(&self.pods)
            .get(&addr)
            .map_or(0, |p| p.in_flight.load(Ordering::Acquire))
    }

    /// Forgets pods that are gone and idle, so the map does not grow with pod churn.
    pub fn retain(&self, alive: impl Fn(&SocketAddr) -> bool) {
        let mut map = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|addr, pod| alive(addr) || pod.in_flight.load(Ordering::Acquire) > 0);
    }
}

/// The lock is held for lookups and inserts that cannot panic.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// The least loaded candidate, the first such from `start` round the list; without
/// collecting them, as every request in the default mode comes here.
fn least(
    candidates: impl Iterator<Item = SocketAddr> + Clone,
    load: impl Fn(&SocketAddr) -> usize,
    start: usize,
) -> Option<SocketAddr> {
    let n = candidates.clone().count();
    let first = start % n.max(1);
    candidates
        .enumerate()
        .min_by_key(|(i, addr)| (load(addr), (i + n - first) % n))
        .map(|(_, addr)| addr)
}

/// Rendezvous hashing: pods ranked by a hash of (prefix, pod), the first whose load stays
/// within `load_factor` times the mean (counting this request) taken.
fn affine(
    candidates: &[SocketAddr],
    load: impl Fn(&SocketAddr) -> usize,
    prefix: &[u8],
    load_factor: f64,
) -> Option<SocketAddr> {
    let total: usize = candidates.iter().map(&load).sum::<usize>() + 1;
    let bound = (total as f64 / candidates.len().max(1) as f64 * load_factor).ceil() as usize;
    let mut ranked: Vec<(u64, SocketAddr)> = candidates
        .iter()
        .map(|addr| {
            let mut h = DefaultHasher::new();
            prefix.hash(&mut h);
            addr.hash(&mut h);
            (h.finish(), *addr)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked
        .iter()
        .map(|&(_, addr)| addr)
        .find(|addr| load(addr) < bound.max(1))
        .or_else(|| least(candidates.iter().copied(), load, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    #[test]
    fn spreads_requests_over_the_least_loaded_pods() {
        let balancer = Balancer::default();
        let pods = pods(3);
        let slots: Vec<Slot> = (0..9)
            .map(|_| balancer.pick(&pods, &[], None, 1.25).unwrap())
            .collect();
        for pod in &pods {
            assert_eq!(balancer.in_flight(*pod), 3);
        }
        // One pod's requests end: it gets the next ones.
        let freed = slots[0].addr;
        drop(
            slots
                .into_iter()
                .filter(|s| s.addr == freed)
                .collect::<Vec<_>>(),
        );
        let next = balancer.pick(&pods, &[], None, 1.25).unwrap();
        assert_eq!(next.addr, freed);
        // A pod already tried is skipped; none left is None.
        let other = balancer.pick(&pods, &[freed], None, 1.25).unwrap();
        assert_ne!(other.addr, freed);
        assert!(balancer.pick(&pods, &pods, None, 1.25).is_none());
    }

    #[test]
    fn one_prefix_stays_on_one_pod_until_it_carries_too_much() {
        let balancer = Balancer::default();
        let pods = pods(4);
        let home = balancer
            .pick(&pods, &[], Some(b"system: be brief"), 1.25)
            .unwrap()
            .addr;
        for _ in 0..3 {
            let again = balancer
                .pick(&pods, &[], Some(b"system: be brief"), 1.25)
                .unwrap();
            assert_eq!(again.addr, home);
        }
        // Prefixes spread over the pods.
        let homes: std::collections::HashSet<SocketAddr> = (0..64)
            .map(|i| {
                let prefix = format!("system {i}");
                let slot = balancer
                    .pick(&pods, &[], Some(prefix.as_bytes()), 100.0)
                    .unwrap();
                slot.addr
            })
            .collect();
        assert_eq!(homes.len(), 4, "{homes:?}");
        // Under a burst of one prefix, no pod goes past 1.25 times the mean.
        let burst: Vec<Slot> = (0..40)
            .map(|_| balancer.pick(&pods, &[], Some(b"hot"), 1.25).unwrap())
            .collect();
        for pod in &pods {
            let n = burst.iter().filter(|s| s.addr == *pod).count();
            assert!(n <= 13, "{n} of 40 on one pod");
        }
    }
}
