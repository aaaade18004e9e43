//! The aperture: of a large fleet, a client sends its calls to the smallest part of it that its
//! load needs, and connects to nothing else. Opt-in ([`crate::balance::Builder::aperture`]).
//!
//! # The problem
//! p2c over every endpoint spreads a client's calls as thin as the fleet is wide. A client with 8
//! calls in flight over 300 replicas sends each call alone on an idle connection: no two calls
//! share a write or a wake-up, and each touches a connection gone cold in the cache. Measured
//! here, its CPU per call grows 1.2-1.6x from 3 to 300 endpoints (tower's own p2c as much), and
//! it holds 300 connections and 300 health watches it has no use for. With an aperture of 12 it
//! stays flat (1.02x at 300, a client in a process of its own).
//!
//! # What this does
//! Finagle's (random) aperture balancer, on our subset: the addresses are ranked by rendezvous
//! hashing with a salt of the client's own ([`crate::discovery::subset`]), and the client
//! connects to the lowest-ranked `size` of them. The size follows the client's load, calls in
//! flight smoothed over a window, so that each member in rotation carries between `low_load` and
//! `high_load` of them (the load band, Finagle's default 0.875-1.125), and at least `min` are in
//! rotation whenever that many are alive:
//! - It looks for as many members in rotation as the load needs (at least `min`): load above
//!   the band (as the smoothed load rises), or members out of rotation (unhealthy, ejected,
//!   unreachable), widen the aperture by what is missing. A member that has just joined (the
//!   first ones too) has `settle` to come into rotation before it counts as missing, so one
//!   ejection adds one member, not one per look, and a client starting up connects to `min`,
//!   not twice as many.
//! - Up to twice what the load needs, missing members are replaced at once; beyond that, one
//!   step per `settle`: in an outage of most of the fleet a client keeps looking for live
//!   members, but does not connect to the whole fleet at once.
//! - Load below the band narrows it, after `narrow_after` of low load, by a quarter of the
//!   members in rotation beyond what the load needs (at least one), and again after each
//!   `narrow_after`: never below what the load needs (no flapping), nor below `min` in rotation.
//!
//! # The price
//! Each client uses its own part of the fleet. Across many clients every address is chosen
//! about equally often (each client's salt is its own), but a few clients over a large fleet
//! leave some replicas idle and give others more than their share; the load band widens a
//! client's aperture only for its own load, not for a replica's. That is why it is off by
//! default: for many clients over a large fleet, where connections and per-call cost matter more.
//! Clients that know their places among themselves ([`crate::discovery::subset::Coordinate`])
//! take slices of a ring they share instead, never fewer than their slice, and leave no replica
//! idle (Finagle's deterministic aperture).
//! A fleet no larger than `min` is used whole, exactly as without an aperture.
//!
//! This module decides a size from numbers handed to it; it knows nothing of addresses,
//! connections or the registry that feeds it.

use std::time::{Duration, Instant};

/// Aperture settings; off unless given to the builder ([`crate::balance::Builder::aperture`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApertureConfig {
    /// Off connects to every discovered endpoint (as without one).
    pub enabled: bool,
    /// The fewest members in rotation (default 12): enough for outlier detection's median and to
    /// lose a few without a thin fleet.
    pub min: usize,
    /// Below this many calls in flight per member in rotation, the aperture narrows (default
    /// 0.875).
    pub low_load: f64,
    /// Above this many, it widens (default 1.125).
    pub high_load: f64,
    /// How long calls in flight are smoothed over (default 5 s).
    pub window: Duration,
    /// How often the load and the members' health are looked at (default 100 ms).
    pub interval: Duration,
    /// How long the load must stay below the band before members are let go (default 5 s).
    pub narrow_after: Duration,
    /// How long a new member has to connect and pass its health check before it counts as
    /// missing (default 2 s; the balancer makes it at least twice its connect timeout).
    pub settle: Duration,
}

impl Default for ApertureConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min: 12,
            low_load: 0.875,
            high_load: 1.125,
            window: Duration::from_secs(5),
            interval: Duration::from_millis(100),
            narrow_after: Duration::from_secs(5),
            settle: Duration::from_secs(2),
        }
    }
}

/// What one look sees of the current members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    /// Members connected to.
    pub count: usize,
    /// Of them, in rotation now.
    pub in_rotation: usize,
    /// Of those out of rotation, the ones that joined less than `settle` ago: taken as on their
    /// way in, not as missing.
    pub settling: usize,
    /// Calls in flight on them, together.
    pub in_flight: u64,
}

/// The aperture's size, decided look by look.
#[derive(Debug)]
pub struct Aperture {
    config: ApertureConfig,
    size: usize,
    /// Calls in flight, smoothed.
    load: f64,
    last_look: Option<Instant>,
    /// Since when the load has been below the band.
    low_since: Option<Instant>,
    /// The members the subset keeps whatever the size (a placed client's slice): narrowing
    /// stops there, or it would narrow below it look after look and change nothing.
    floor: usize,
}

impl Aperture {
    /// An aperture of `min` members (at least 1).
    pub fn new(mut config: ApertureConfig) -> Self {
        config.min = config.min.max(1);
        // A band the wrong way round (or zero) would widen forever or never; keep it a band.
        if !(config.high_load.is_finite() && config.high_load > 0.0) {
            config.high_load = ApertureConfig::default().high_load;
        }
        if !(config.low_load.is_finite() && config.low_load >= 0.0) {
            config.low_load = 0.0;
        }
        config.low_load = config.low_load.min(config.high_load);
        Self {
            size: config.min,
            config,
            load: 0.0,
            last_look: None,
            low_since: None,
            floor: 0,
        }
    }

    /// The members the subset keeps whatever the size asked of it
    /// ([`crate::discovery::subset::Subset::floor`]).
    pub fn set_floor(&mut self, floor: usize) {
        self.floor = floor;
    }

    /// The members wanted now.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Calls in flight, as smoothed so far.
    pub fn load(&self) -> f64 {
        self.load
    }

    /// How often to look.
    pub fn interval(&self) -> Duration {
        self.config.interval.max(Duration::from_millis(1))
    }

    /// How long a new member may take to come into rotation before it counts as missing.
    pub fn settle(&self) -> Duration {
        self.config.settle
    }

    /// One look at the members, with `known` addresses to choose from; returns the size wanted.
    pub fn look(&mut self, now: Instant, members: Members, known: usize) -> usize {
        let c = self.config;
        let elapsed = self
            .last_look
            .map_or(c.window, |last| now.saturating_duration_since(last));
        self.last_look = Some(now);
        let alpha = if c.window.is_zero() {
            1.0
        } else {
            1.0 - (-elapsed.as_secs_f64() / c.window.as_secs_f64()).exp()
        };
        self.load += alpha * (members.in_flight as f64 - self.load);

        // In rotation, the load needs this many (a float cast saturates, never wraps).
        let needed = ((self.load / c.high_load).ceil() as usize).max(c.min);
        let deficit = needed.saturating_sub(members.in_rotation + members.settling);
        // Up to twice the need, what is missing is replaced at once; beyond that only once every
        // member has had its `settle`, so an outage of most of the fleet makes a client look
        // further a step at a time, not connect to all of it at once.
        let cap = if members.settling == 0 {
            usize::MAX
        } else {
            needed.saturating_mul(2)
        };
        let grown = members.count.saturating_add(deficit).min(cap);
        let mut size = self.size.max(grown).min(known.max(c.min));

        let excess = members.in_rotation.saturating_sub(needed);
        let low = self.load < c.low_load * members.in_rotation as f64;
        let least = c.min.max(self.floor);
        if size > self.size || excess == 0 || !low || size <= least {
            self.low_since = None;
        } else {
            match self.low_since {
                None => self.low_since = Some(now),
                Some(since) if now.duration_since(since) >= c.narrow_after => {
                    size -= excess.div_ceil(4).min(size - least);
                    self.low_since = Some(now);
                }
                Some(_) => {}
            }
        }
        // Never below `min`: the ceiling is at least `min`, and narrowing stops there (or at the
        // floor).
        self.size = size;
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn config() -> ApertureConfig {
        ApertureConfig {
            min: 4,
            window: Duration::from_secs(1),
            narrow_after: Duration::from_secs(2),
            ..ApertureConfig::default()
        }
    }

    /// A simulated fleet: member `i` joins when the aperture first reaches it, and comes into
    /// rotation `ready_after` later if `alive(i)` and it has not been killed.
    struct Fleet {
        joined: Vec<Instant>,
        alive: fn(usize) -> bool,
        killed: BTreeSet<usize>,
        ready_after: Duration,
        in_flight: u64,
        /// Members that joined, counting each return.
        joins: usize,
    }

    impl Fleet {
        fn healthy(in_flight: u64) -> Self {
            Self {
                joined: Vec::new(),
                alive: |_| true,
                killed: BTreeSet::new(),
                ready_after: Duration::ZERO,
                in_flight,
                joins: 0,
            }
        }

        fn members(&mut self, n: usize, now: Instant, settle: Duration) -> Members {
            self.joined.truncate(n);
            self.joins += n - self.joined.len();
            self.joined.resize(n, now);
            let mut members = Members {
                count: n,
                in_rotation: 0,
                settling: 0,
                in_flight: self.in_flight,
            };
            for (i, joined) in self.joined.iter().enumerate() {
                let age = now.duration_since(*joined);
                if (self.alive)(i) && !self.killed.contains(&i) && age >= self.ready_after {
                    members.in_rotation += 1;
                } else if age < settle {
                    members.settling += 1;
                }
            }
            members
        }

        /// Looks every 100 ms for `secs`, with `known` addresses; returns the size.
        fn run(&mut self, a: &mut Aperture, t: &mut Instant, secs: u64, known: usize) -> usize {
            let end = *t + Duration::from_secs(secs);
            while *t < end {
                *t += Duration::from_millis(100);
                let members = self.members(a.size().min(known), *t, a.settle());
                a.look(*t, members, known);
            }
            a.size()
        }

        fn in_rotation(&mut self, a: &Aperture, t: Instant, known: usize) -> usize {
            self.members(a.size().min(known), t, a.settle()).in_rotation
        }
    }

    /// Looks for `secs` at a fleet of healthy members with `in_flight` calls on them.
    fn steady(a: &mut Aperture, t: &mut Instant, secs: u64, known: usize, in_flight: u64) -> usize {
        Fleet::healthy(in_flight).run(a, t, secs, known)
    }

    #[test]
    fn a_light_load_keeps_the_minimum_from_the_start() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // The first members take a second to connect: they are not replaced meanwhile.
        let mut fleet = Fleet {
            ready_after: Duration::from_secs(1),
            ..Fleet::healthy(3)
        };
        assert_eq!(fleet.run(&mut a, &mut t, 10, 300), 4);
        assert_eq!(fleet.joined.len(), 4, "no member joined beyond the minimum");
    }

    #[test]
    fn load_above_the_band_widens_to_what_it_needs_and_a_lull_narrows_it_back() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // 40 calls in flight need 40 / 1.125 = 36 members.
        let size = steady(&mut a, &mut t, 10, 300, 40);
        assert_eq!(size, 36, "load {}", a.load());
        // The fleet is only 20 wide: never more than there is.
        let mut narrow = Aperture::new(config());
        let mut t2 = Instant::now();
        assert_eq!(steady(&mut narrow, &mut t2, 10, 20, 40), 20);

        // The load stops: nothing goes for the first 2 s of low load, then a quarter of the
        // surplus every 2 s, never below the minimum.
        assert_eq!(steady(&mut a, &mut t, 1, 300, 0), 36);
        let size = steady(&mut a, &mut t, 6, 300, 0);
        assert!((9..=28).contains(&size), "36 -> {size} in 7 s");
        assert_eq!(steady(&mut a, &mut t, 30, 300, 0), 4);
    }

    #[test]
    fn a_lull_narrows_to_the_floor_and_no_further() {
        // A placed client's slice of 300 among 20 is 15 (its subset keeps them whatever the
        // size): the lull narrows to it, not to the minimum of 4.
        let mut a = Aperture::new(config());
        a.set_floor(15);
        let mut t = Instant::now();
        assert_eq!(steady(&mut a, &mut t, 10, 300, 40), 36);
        assert_eq!(steady(&mut a, &mut t, 30, 300, 0), 15);
        assert_eq!(steady(&mut a, &mut t, 30, 300, 0), 15, "and stays there");
    }

    #[test]
    fn within_the_band_it_holds_still() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // 10 in flight from below: 9 members at 1.11 each is inside the band; 8 would be above.
        assert_eq!(steady(&mut a, &mut t, 10, 300, 10), 9);
        assert_eq!(steady(&mut a, &mut t, 60, 300, 10), 9);
        // From above (after 40 in flight): it narrows until 10 calls are 0.875 or more per
        // member, 11 members at 0.91, and stays there.
        let mut b = Aperture::new(config());
        let mut t = Instant::now();
        assert_eq!(steady(&mut b, &mut t, 10, 300, 40), 36);
        assert_eq!(steady(&mut b, &mut t, 60, 300, 10), 11);
        assert_eq!(steady(&mut b, &mut t, 60, 300, 10), 11);
    }

    #[test]
    fn a_member_out_of_rotation_is_replaced_once_not_once_per_look() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // The first member never comes into rotation; the others take 1 s each.
        let mut fleet = Fleet {
            alive: |i| i != 0,
            ready_after: Duration::from_secs(1),
            ..Fleet::healthy(2)
        };
        assert_eq!(fleet.run(&mut a, &mut t, 10, 300), 5);
        assert_eq!(fleet.in_rotation(&a, t, 300), 4);
        assert_eq!(fleet.joins, 5, "nobody left and joined again");
    }

    #[test]
    fn unreachable_members_are_replaced_until_the_minimum_is_in_rotation() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // Every other address is dead.
        let mut fleet = Fleet {
            alive: |i| i % 2 == 0,
            ..Fleet::healthy(1)
        };
        assert_eq!(fleet.run(&mut a, &mut t, 30, 300), 7, "0, 2, 4 and 6 serve");
        assert_eq!(fleet.in_rotation(&a, t, 300), 4);
    }

    #[test]
    fn members_lost_above_the_minimum_are_replaced_as_the_load_needs() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        let mut fleet = Fleet::healthy(20);
        // 20 in flight need 18 in rotation.
        assert_eq!(fleet.run(&mut a, &mut t, 10, 300), 18);
        fleet.killed.extend(0..7);
        assert_eq!(fleet.run(&mut a, &mut t, 10, 300), 25);
        assert_eq!(fleet.in_rotation(&a, t, 300), 18);
    }

    #[test]
    fn an_outage_looks_further_a_step_at_a_time_and_recovery_narrows_back() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        // Only the addresses ranked 20th and beyond are alive.
        let mut fleet = Fleet {
            alive: |i| i >= 20,
            ..Fleet::healthy(1)
        };
        // One settle (2 s) in: the first 4 replaced once, not the fleet connected to.
        assert_eq!(fleet.run(&mut a, &mut t, 3, 300), 8);
        // Then 4 more per settle until 4 live ones are found.
        assert_eq!(fleet.run(&mut a, &mut t, 30, 300), 24);
        assert_eq!(fleet.in_rotation(&a, t, 300), 4);
        // Everyone back: the surplus goes, a quarter at a time.
        fleet.alive = |_| true;
        assert_eq!(fleet.run(&mut a, &mut t, 30, 300), 4);
    }

    #[test]
    fn a_fleet_smaller_than_the_minimum_is_used_whole_and_may_grow_back() {
        let mut a = Aperture::new(config());
        let mut t = Instant::now();
        assert_eq!(
            steady(&mut a, &mut t, 5, 3, 30),
            4,
            "the 3 there are, and room for one"
        );
        assert_eq!(steady(&mut a, &mut t, 5, 2, 1), 4);
        assert_eq!(
            steady(&mut a, &mut t, 5, 300, 1),
            4,
            "the fleet back, the minimum"
        );
        // Nonsense settings do not stop it deciding.
        let mut odd = Aperture::new(ApertureConfig {
            min: usize::MAX,
            high_load: f64::NAN,
            low_load: 5.0,
            window: Duration::ZERO,
            ..config()
        });
        let one = Members {
            count: 1,
            in_rotation: 1,
            settling: 0,
            in_flight: u64::MAX,
        };
        assert_eq!(odd.look(Instant::now(), one, 100), usize::MAX);
        let mut zero = Aperture::new(ApertureConfig {
            min: 0,
            window: Duration::ZERO,
            ..config()
        });
        assert_eq!(
            zero.look(
                Instant::now(),
                Members {
                    in_flight: 9,
                    ..one
                },
                100
            ),
            8
        );
    }
}
