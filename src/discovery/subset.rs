//! Subsetting: of every address discovery finds, this client connects to a bounded subset, so a
//! client's connections, health watches and per-call transport cost stay the same whether the
//! service has 20 replicas or 2,000 (gRPC's `random_subsetting_experimental`, gRFC A68).
//!
//! The subset is chosen by rendezvous hashing: each address is hashed with a salt drawn once per
//! client, and the `size` addresses with the lowest hashes are kept. Different clients draw
//! different salts, so across many clients every address is chosen about equally often; and
//! because an address's hash never changes, one address added or removed changes at most one
//! member of a client's subset (no reshuffle of connections during a rollout).
//!
//! The subset is chosen again once per batch of changes (a DNS answer's removals and insertions
//! arrive together), not after each one: filled one address at a time, a subset of 20 of 300
//! would pass through some 70 members, each connected and then dropped.
//!
//! Its size may change ([`Subset::resize`]): the aperture ([`crate::balance::aperture`]) sizes it
//! by the client's load.
//!
//! # A client that knows its place: deterministic subsets
//! Random salts leave a few clients over a large fleet covering it unevenly: 20 clients with
//! subsets of 12 over 300 replicas leave about 44 % of the replicas with no client at all, and
//! give others two or three clients' share. A client that knows its [`Coordinate`] (client `i`
//! of `n`, from a StatefulSet's ordinal, say) takes a slice of a ring instead (Finagle's
//! deterministic aperture; the SRE book's deterministic subsetting): every client orders the
//! known addresses the same way (sorted), client `i` starts at position `i * known / n`, and
//! takes the next `size` addresses round the ring, never fewer than its own slice,
//! `ceil(known / n)`. The slices tile the ring, so with every coordinate taken (and every client
//! seeing the same addresses) every address has a client; where the clients' subsets are of one
//! size, each address has within one of the same number of clients (an aperture's size follows
//! its own client's load, so apertures promise only the first). The price: a lone client (`0/1`)
//! covers the whole fleet, and an address added or removed moves each client's window by a step
//! (at most two members leave and two join, one and one unless the window wraps round the
//! ring's end), where a salted subset changes by at most one member and only in the clients that
//! hold it.
//!
//! A filter on addresses only: it knows nothing of health, load or connections. A subset member
//! that is unhealthy stays a member (its gate keeps it out of rotation), as in A68.

use super::Update;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use tower::discover::Change;

/// This client's place among the `count` clients of one service that share the fleet: client
/// `index` (from 0). Written `index/count`, as `3/20`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coordinate {
    index: u32,
    count: u32,
}

impl Coordinate {
    /// Client `index` of `count`; `None` unless `index < count`.
    pub fn new(index: u32, count: u32) -> Option<Self> {
        (index < count).then_some(Self { index, count })
    }

    /// This client's index, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many clients share the fleet.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Where this client's slice of `known` ring positions starts.
    fn start(&self, known: usize) -> usize {
        (self.index as u128 * known as u128 / self.count as u128) as usize
    }

    /// The addresses one client's slice holds, so that the `count` slices cover `known`.
    fn slice(&self, known: usize) -> usize {
        known.div_ceil(self.count as usize)
    }
}

impl std::fmt::Display for Coordinate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why a coordinate did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a coordinate I/COUNT with I below COUNT (as 3/20)")]
pub struct CoordinateError(String);

impl std::str::FromStr for Coordinate {
    type Err = CoordinateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split_once('/')
            .and_then(|(i, n)| Self::new(i.trim().parse().ok()?, n.trim().parse().ok()?))
            .ok_or_else(|| CoordinateError(text.to_string()))
    }
}

/// How a client ranks the addresses it chooses from.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// By a hash salted with the client's own salt (rendezvous).
    Salted(u64),
    /// Round a ring all clients share, from this client's place on it.
    Ring(Coordinate),
}

/// The addresses known and the subset kept of them.
#[derive(Debug)]
pub struct Subset {
    size: usize,
    order: Order,
    /// Every known address, by its rank (lowest hash first; unused round a ring).
    ranked: BTreeSet<(u64, SocketAddr)>,
    /// Each known address's rank, by address: also the ring, in order.
    ranks: BTreeMap<SocketAddr, u64>,
    /// The members handed on, as the next stage knows them.
    members: BTreeSet<SocketAddr>,
}

impl Subset {
    /// A subset of at most `size` addresses (at least 1), with a salt of its own.
    pub fn new(size: usize) -> Self {
        Self::with_salt(size, rand::random())
    }

    /// A subset with a given salt: the same salt and addresses always give the same subset.
    pub fn with_salt(size: usize, salt: u64) -> Self {
        Self::ordered(size, Order::Salted(salt))
    }

    /// A deterministic subset: client `coordinate`'s slice of the ring (see the module), at
    /// least `size` addresses.
    pub fn placed(size: usize, coordinate: Coordinate) -> Self {
        Self::ordered(size, Order::Ring(coordinate))
    }

    fn ordered(size: usize, order: Order) -> Self {
        Self {
            size: size.max(1),
            order,
            ranked: BTreeSet::new(),
            ranks: BTreeMap::new(),
            members: BTreeSet::new(),
        }
    }

    fn rank(&self, addr: &SocketAddr) -> u64 {
        let Order::Salted(salt) = self.order else {
            // Round a ring an address's place follows from the others: see `wanted`.
            return 0;
        };
        // Fixed keys (`new`, not a `RandomState`): the salt alone makes the ranking this
        // client's own, and the same salt ranks the same way in a test.
        let mut hasher = std::hash::DefaultHasher::new();
        salt.hash(&mut hasher);
        addr.hash(&mut hasher);
        hasher.finish()
    }

    /// The fewest members it keeps whatever its size: a placed client's slice of the addresses
    /// known (0 for a salted subset).
    pub fn floor(&self) -> usize {
        match self.order {
            Order::Salted(_) => 0,
            Order::Ring(coordinate) => coordinate.slice(self.ranks.len()),
        }
    }

    /// The members the known addresses and the size call for.
    fn wanted(&self) -> BTreeSet<SocketAddr> {
        match self.order {
            Order::Salted(_) => self
                .ranked
                .iter()
                .take(self.size)
                .map(|(_, addr)| *addr)
                .collect(),
            Order::Ring(coordinate) => {
                let known = self.ranks.len();
                let size = self.size.max(self.floor());
                self.ranks
                    .keys()
                    .cycle()
                    .skip(coordinate.start(known))
                    .take(size.min(known))
                    .copied()
                    .collect()
            }
        }
    }

    /// Takes one change from discovery and returns the changes to the subset it causes (see
    /// [`Subset::apply_all`]).
    pub fn apply(&mut self, change: Update) -> Vec<Update> {
        self.apply_all([change])
    }

    /// Takes a batch of changes from discovery and returns the changes to the subset they cause
    /// together: none (addresses outside the subset came or went), or a few (a member left and
    /// the next in rank joins; a new address ranks above a member, which leaves). Removals come
    /// first, so the next stage never holds more members than it ends with (`size`; round a
    /// ring, at least the client's slice).
    pub fn apply_all(&mut self, changes: impl IntoIterator<Item = Update>) -> Vec<Update> {
        for change in changes {
            match change {
                Change::Insert(addr, ()) => {
                    if !self.ranks.contains_key(&addr) {
                        let rank = self.rank(&addr);
                        self.ranks.insert(addr, rank);
                        if let Order::Salted(_) = self.order {
                            self.ranked.insert((rank, addr));
                        }
                    }
                }
                Change::Remove(addr) => {
                    if let Some(rank) = self.ranks.remove(&addr) {
                        self.ranked.remove(&(rank, addr));
                    }
                }
            }
        }
        let wanted = self.wanted();
        let mut changes: Vec<Update> = self
            .members
            .difference(&wanted)
            .map(|addr| Change::Remove(*addr))
            .collect();
        changes.extend(
            wanted
                .difference(&self.members)
                .map(|addr| Change::Insert(*addr, ())),
        );
        self.members = wanted;
        changes
    }

    /// Changes the size (at least 1) and returns the changes to the subset it causes: the next
    /// addresses in rank join, or the highest-ranked members leave.
    pub fn resize(&mut self, size: usize) -> Vec<Update> {
        self.size = size.max(1);
        self.apply_all([])
    }

    /// The size asked for (the members are fewer while fewer addresses are known, and may be
    /// more round a ring: never fewer than the client's slice).
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The current members.
    pub fn members(&self) -> impl Iterator<Item = &SocketAddr> {
        self.members.iter()
    }

    /// How many addresses are known, members or not.
    pub fn known(&self) -> usize {
        self.ranks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 50051))
    }

    fn filled(size: usize, salt: u64, n: usize) -> Subset {
        let mut subset = Subset::with_salt(size, salt);
        for i in 0..n {
            subset.apply(Change::Insert(addr(i), ()));
        }
        subset
    }

    fn members(subset: &Subset) -> BTreeSet<SocketAddr> {
        subset.members().copied().collect()
    }

    #[test]
    fn keeps_at_most_its_size_and_everything_below_it() {
        assert_eq!(filled(5, 1, 3).members().count(), 3);
        let subset = filled(5, 1, 100);
        assert_eq!(subset.members().count(), 5);
        assert_eq!(subset.known(), 100);
        // A size of 0 would connect to nothing: it is taken as 1.
        assert_eq!(filled(0, 1, 10).members().count(), 1);
    }

    #[test]
    fn every_change_it_hands_on_keeps_the_next_stage_within_the_size() {
        let mut subset = Subset::with_salt(3, 7);
        let mut held = BTreeSet::new();
        for step in 0..400usize {
            let a = addr(step * 7 % 60);
            let change = if step % 3 == 0 {
                Change::Remove(a)
            } else {
                Change::Insert(a, ())
            };
            for out in subset.apply(change) {
                match out {
                    Change::Insert(a, ()) => assert!(held.insert(a), "{a} inserted twice"),
                    Change::Remove(a) => assert!(held.remove(&a), "{a} removed but not held"),
                }
                assert!(held.len() <= 3, "the next stage holds {}", held.len());
            }
            assert_eq!(held, members(&subset));
        }
    }

    #[test]
    fn an_address_outside_the_subset_changes_nothing() {
        let mut subset = filled(4, 11, 40);
        let before = members(&subset);
        let outsider = (0..40)
            .map(addr)
            .find(|a| !before.contains(a))
            .expect("40 addresses, 4 members");
        assert!(subset.apply(Change::Remove(outsider)).is_empty());
        assert!(subset.apply(Change::Insert(outsider, ())).is_empty());
        // A repeated insertion of a member changes nothing either.
        let member = *before.iter().next().expect("a member");
        assert!(subset.apply(Change::Insert(member, ())).is_empty());
        assert_eq!(members(&subset), before);
    }

    #[test]
    fn one_address_added_or_removed_changes_at_most_one_member() {
        for salt in 0..50 {
            let mut subset = filled(5, salt, 30);
            let before = members(&subset);
            let gone = *before.iter().next().expect("a member");
            let changes = subset.apply(Change::Remove(gone));
            assert_eq!(
                changes.len(),
                2,
                "the member leaves and the next in rank joins"
            );
            assert!(matches!(changes[0], Change::Remove(a) if a == gone));
            assert_eq!(members(&subset).intersection(&before).count(), 4);

            let changes = subset.apply(Change::Insert(addr(1000 + salt as usize), ()));
            assert!(changes.len() <= 2, "{changes:?}");
            assert!(members(&subset).len() == 5);
        }
    }

    #[test]
    fn a_batch_hands_on_only_the_subset_it_ends_with() {
        let mut subset = Subset::with_salt(20, 5);
        let changes = subset.apply_all((0..300).map(|i| Change::Insert(addr(i), ())));
        assert_eq!(changes.len(), 20, "only the final members are connected");
        assert!(changes.iter().all(|c| matches!(c, Change::Insert(..))));
        // A whole fleet replaced in one answer: 20 leave, 20 join, nothing in between.
        let replaced = (0..300)
            .map(|i| Change::Remove(addr(i)))
            .chain((300..600).map(|i| Change::Insert(addr(i), ())));
        let changes = subset.apply_all(replaced);
        assert_eq!(changes.len(), 40);
        assert!(changes[..20]
            .iter()
            .all(|c| matches!(c, Change::Remove(..))));
        assert_eq!(members(&subset).len(), 20);
        assert!(members(&subset)
            .iter()
            .all(|a| !members(&filled(20, 5, 300)).contains(a)));
    }

    #[test]
    fn resizing_adds_the_next_in_rank_and_lets_the_last_go() {
        let mut subset = filled(4, 9, 50);
        let four = members(&subset);
        let wider = subset.resize(7);
        assert_eq!(wider.len(), 3);
        assert!(wider.iter().all(|c| matches!(c, Change::Insert(..))));
        assert!(four.is_subset(&members(&subset)), "the members stay");
        assert_eq!(members(&subset), members(&filled(7, 9, 50)));
        let narrower = subset.resize(4);
        assert_eq!(narrower.len(), 3);
        assert!(narrower.iter().all(|c| matches!(c, Change::Remove(..))));
        assert_eq!(members(&subset), four);
        assert!(subset.resize(4).is_empty());
        assert_eq!(subset.size(), 4);
    }

    #[test]
    fn the_same_salt_gives_the_same_subset_in_any_order() {
        let forward = filled(6, 42, 50);
        let mut backward = Subset::with_salt(6, 42);
        for i in (0..50).rev() {
            backward.apply(Change::Insert(addr(i), ()));
        }
        assert_eq!(members(&forward), members(&backward));
    }

    #[test]
    fn across_clients_every_address_is_chosen_about_equally() {
        // 1,000 clients with subsets of 3 of 10 addresses: each address is expected in 300.
        let mut chosen = BTreeMap::<SocketAddr, usize>::new();
        for salt in 0..1000 {
            for a in filled(3, salt, 10).members() {
                *chosen.entry(*a).or_default() += 1;
            }
        }
        assert_eq!(chosen.len(), 10, "{chosen:?}");
        for (a, n) in &chosen {
            assert!((200..=400).contains(n), "{a} chosen by {n} of 1000 clients");
        }
    }

    fn placed(size: usize, index: u32, count: u32, n: usize) -> Subset {
        let mut subset =
            Subset::placed(size, Coordinate::new(index, count).expect("index < count"));
        subset.apply_all((0..n).map(|i| Change::Insert(addr(i), ())));
        subset
    }

    /// How many of `clients` hold each of the first `n` addresses.
    fn coverage<'a>(clients: impl IntoIterator<Item = &'a Subset>, n: usize) -> Vec<usize> {
        let mut held = vec![0; n];
        for client in clients {
            for a in client.members() {
                let i = (0..n).find(|i| addr(*i) == *a).expect("a known address");
                held[i] += 1;
            }
        }
        held
    }

    #[test]
    fn a_coordinate_is_written_index_slash_count() {
        let c: Coordinate = "3/20".parse().expect("3/20");
        assert_eq!((c.index(), c.count()), (3, 20));
        assert_eq!(c.to_string(), "3/20");
        assert_eq!(" 0 / 1 ".parse::<Coordinate>().map(|c| c.count()), Ok(1));
        for bad in ["20/20", "0/0", "3", "a/3", "3/b", "-1/3", "", "1/2/3"] {
            let error = bad.parse::<Coordinate>().expect_err(bad);
            assert!(error.to_string().contains("I/COUNT"), "{error}");
        }
    }

    #[test]
    fn placed_clients_give_every_address_a_client_where_salted_ones_leave_some_idle() {
        // The case that keeps the salted aperture opt-in: 20 clients of 12 over 300 replicas.
        let salted: Vec<Subset> = (0..20).map(|salt| filled(12, salt, 300)).collect();
        let idle = coverage(&salted, 300).iter().filter(|n| **n == 0).count();
        assert!(idle > 60, "salted subsets leave {idle} of 300 idle");

        // Placed, each takes at least its slice (15 of 300): the slices tile the ring.
        let placed_20: Vec<Subset> = (0..20).map(|i| placed(12, i, 20, 300)).collect();
        assert!(placed_20.iter().all(|c| c.len() == 15));
        assert!(coverage(&placed_20, 300).iter().all(|n| *n == 1));

        // Wider than the slice, and a fleet the clients do not divide: every address has a
        // client, and none has more than one client more than another.
        for (size, n) in [(30, 300), (12, 301), (40, 307), (5, 17)] {
            let clients: Vec<Subset> = (0..20).map(|i| placed(size, i, 20, n)).collect();
            let held = coverage(&clients, n);
            let (least, most) = (held.iter().min(), held.iter().max());
            assert!(least >= Some(&1), "size {size} of {n}: {held:?}");
            assert!(
                most <= least.map(|l| l + 1).as_ref(),
                "size {size} of {n}: {held:?}"
            );
        }
    }

    #[test]
    fn a_lone_placed_client_covers_the_whole_fleet() {
        assert_eq!(placed(12, 0, 1, 300).len(), 300);
        // Asked for more than there are: every address, once.
        assert_eq!(placed(12, 1, 4, 8).len(), 8);
    }

    /// Whether a placed subset's window runs past the ring's end.
    fn wraps(subset: &Subset) -> bool {
        let Order::Ring(coordinate) = subset.order else {
            return false;
        };
        let known = subset.known();
        coordinate.start(known) + subset.size.max(subset.floor()) > known
    }

    #[test]
    fn one_address_added_or_removed_moves_a_placed_window_a_step() {
        // (left, joined) at most, for one insertion or removal anywhere on the ring.
        fn moved(changes: &[Update]) -> (usize, usize) {
            let left = changes
                .iter()
                .filter(|c| matches!(c, Change::Remove(_)))
                .count();
            (left, changes.len() - left)
        }
        let (mut worst, mut unwrapped_worst) = ((0, 0), (0, 0));
        for index in 0..20 {
            for size in [12, 15, 40] {
                // Every position: before the first address, between any two, after the last.
                // Port 50050 sorts just before `addr(at - 1)`, and after `addr(59)` at 61.
                for at in 1..=61 {
                    let mut subset = placed(size, index, 20, 60);
                    let wrapped = wraps(&subset);
                    let new = SocketAddr::from(([10, 0, 0, at as u8], 50050));
                    let m = moved(&subset.apply(Change::Insert(new, ())));
                    assert!(
                        m.0 <= 2 && m.1 <= 2,
                        "{index}/20, {size}, insert at {at}: {m:?}"
                    );
                    worst = worst.max(m);
                    if !wrapped && !wraps(&subset) {
                        assert!(m.0 <= 1 && m.1 <= 2, "{index}/20, {size}, at {at}: {m:?}");
                        unwrapped_worst = unwrapped_worst.max(m);
                    }
                }
                for gone in 0..60 {
                    let mut subset = placed(size, index, 20, 60);
                    let m = moved(&subset.apply(Change::Remove(addr(gone))));
                    assert!(
                        m.0 <= 2 && m.1 <= 2,
                        "{index}/20, {size}, remove {gone}: {m:?}"
                    );
                    assert!(!members(&subset).contains(&addr(gone)));
                    worst = worst.max(m);
                }
            }
        }
        // The bounds are reached, so the test would see them exceeded.
        assert_eq!(worst, (2, 2));
        assert!(unwrapped_worst.0 <= 1, "{unwrapped_worst:?}");
    }

    #[test]
    fn a_placed_subset_is_the_same_whatever_order_its_addresses_came_in() {
        let forward = placed(6, 5, 9, 50);
        let mut backward = Subset::placed(6, Coordinate::new(5, 9).expect("5 < 9"));
        for i in (0..50).rev() {
            backward.apply(Change::Insert(addr(i), ()));
        }
        assert_eq!(members(&forward), members(&backward));
        // And resizing it widens it round the ring, from where it starts.
        let mut wider = placed(6, 5, 9, 50);
        let added = wider.resize(9);
        assert_eq!(added.len(), 3);
        assert!(members(&forward).is_subset(&members(&wider)));
    }
}
