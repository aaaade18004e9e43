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
//! A filter on addresses only: it knows nothing of health, load or connections. A subset member
//! that is unhealthy stays a member (its gate keeps it out of rotation), as in A68.

use super::Update;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use tower::discover::Change;

/// The addresses known and the subset kept of them.
#[derive(Debug)]
pub struct Subset {
    size: usize,
    salt: u64,
    /// Every known address, by its rank (lowest hash first).
    ranked: BTreeSet<(u64, SocketAddr)>,
    /// Each known address's rank.
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
        Self {
            size: size.max(1),
            salt,
            ranked: BTreeSet::new(),
            ranks: BTreeMap::new(),
            members: BTreeSet::new(),
        }
    }

    fn rank(&self, addr: &SocketAddr) -> u64 {
        // Fixed keys (`new`, not a `RandomState`): the salt alone makes the ranking this
        // client's own, and the same salt ranks the same way in a test.
        let mut hasher = std::hash::DefaultHasher::new();
        self.salt.hash(&mut hasher);
        addr.hash(&mut hasher);
        hasher.finish()
    }

    /// Takes one change from discovery and returns the changes to the subset it causes (see
    /// [`Subset::apply_all`]).
    pub fn apply(&mut self, change: Update) -> Vec<Update> {
        self.apply_all([change])
    }

    /// Takes a batch of changes from discovery and returns the changes to the subset they cause
    /// together: none (addresses outside the subset came or went), or a few (a member left and
    /// the next in rank joins; a new address ranks above a member, which leaves). Removals come
    /// first, so the next stage never holds more than `size` members.
    pub fn apply_all(&mut self, changes: impl IntoIterator<Item = Update>) -> Vec<Update> {
        for change in changes {
            match change {
                Change::Insert(addr, ()) => {
                    if !self.ranks.contains_key(&addr) {
                        let rank = self.rank(&addr);
                        self.ranks.insert(addr, rank);
                        self.ranked.insert((rank, addr));
                    }
                }
                Change::Remove(addr) => {
                    if let Some(rank) = self.ranks.remove(&addr) {
                        self.ranked.remove(&(rank, addr));
                    }
                }
            }
        }
        let wanted: BTreeSet<SocketAddr> = self
            .ranked
            .iter()
            .take(self.size)
            .map(|(_, addr)| *addr)
            .collect();
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

    /// The size asked for (the members are fewer while fewer addresses are known).
    pub fn size(&self) -> usize {
        self.size
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
}
