//! Tests of the link policy on a virtual clock: an `Instant` base plus
//! offsets, and a driver that sleeps until `poll_timeout()` like the worker.

use super::*;
use proptest::prelude::*;
use std::time::{Duration, Instant};

type Addr = &'static str;

const R1: Addr = "/relay-1/circuit";
const R2: Addr = "/relay-2/circuit";
const F1: Addr = "/member-1/circuit";
const F2: Addr = "/member-2/circuit";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn dial() -> Action<Addr> {
    Action::Dial(vec![R1])
}

/// The virtual clock and a worker stand-in: inputs at the current time,
/// wake-ups exactly at `poll_timeout()`, every action logged with its time
/// in ms since the start.
struct Sim {
    p: LinkPolicy<Addr>,
    base: Instant,
    now: Instant,
    log: Vec<(u64, Action<Addr>)>,
}

impl Sim {
    fn new(leads: bool, control_punch: bool) -> Self {
        Self::with_config(PolicyConfig::default(), leads, control_punch)
    }

    fn with_config(config: PolicyConfig, leads: bool, control_punch: bool) -> Self {
        let base = Instant::now();
        Self {
            p: LinkPolicy::new(config, leads, control_punch),
            base,
            now: base,
            log: Vec::new(),
        }
    }

    fn leader() -> Self {
        Self::new(true, true)
    }

    fn follower() -> Self {
        Self::new(false, true)
    }

    /// A leader that does not punch: its dials alone.
    fn dialer() -> Self {
        Self::new(true, false)
    }

    fn t(&self) -> u64 {
        self.now.duration_since(self.base).as_millis() as u64
    }

    fn drain(&mut self) {
        let t = self.t();
        while let Some(a) = self.p.poll_action() {
            self.log.push((t, a));
        }
    }

    /// Advances to `t` ms, waking at every `poll_timeout()` on the way.
    fn run_to(&mut self, t: u64) {
        let end = self.base + ms(t);
        assert!(end >= self.now, "time runs forwards");
        while let Some(due) = self.p.poll_timeout() {
            if due > end {
                break;
            }
            assert!(due > self.now, "poll_timeout in the past or now");
            self.now = due;
            self.p.handle_timeout(due);
            self.drain();
        }
        self.now = end;
    }

    /// Advances to `t` ms, then applies an input there.
    fn at(&mut self, t: u64) -> &mut Self {
        self.run_to(t);
        self
    }

    fn addresses(&mut self, relay: &[Addr], forwarded: &[Addr]) -> &mut Self {
        self.p
            .set_addresses(relay.to_vec(), forwarded.to_vec(), self.now);
        self.drain();
        self
    }

    fn connected(&mut self, kind: PathKind) -> &mut Self {
        self.p.connected(kind, self.now);
        self.drain();
        self
    }

    fn disconnected(&mut self, kind: PathKind) -> &mut Self {
        self.p.disconnected(kind, self.now);
        self.drain();
        self
    }

    fn dial_failed(&mut self) -> &mut Self {
        self.p.dial_failed(self.now);
        self.drain();
        self
    }

    fn waiting(&mut self, waiting: bool) -> &mut Self {
        self.p.set_waiting(waiting, self.now);
        self.drain();
        self
    }

    /// The logged actions, cleared.
    fn take(&mut self) -> Vec<(u64, Action<Addr>)> {
        std::mem::take(&mut self.log)
    }

    /// Times of the logged actions equal to `a`, the log cleared.
    fn times(&mut self, a: &Action<Addr>) -> Vec<u64> {
        self.take()
            .into_iter()
            .filter(|(_, x)| x == a)
            .map(|(t, _)| t)
            .collect()
    }

    /// `poll_timeout()` in ms since the start.
    fn timeout(&self) -> Option<u64> {
        self.p
            .poll_timeout()
            .map(|t| t.duration_since(self.base).as_millis() as u64)
    }
}

// ----- the rules' plain facts ----------------------------------------------

#[test]
fn default_config_is_todays_values() {
    let c = PolicyConfig::default();
    assert_eq!(c.redial, ms(500));
    assert_eq!(c.follower_patience, c.redial * 4);
    let quick: Vec<_> = (0..c.quick_redials)
        .map(|n| c.quick_redial_wait(n))
        .collect();
    assert_eq!(quick, [ms(50), ms(100), ms(200)]);
    let punch: Vec<_> = (0..8).map(|n| c.punch_backoff(n)).collect();
    let secs = |v: &[u64]| v.iter().map(|&m| ms(m)).collect::<Vec<_>>();
    assert_eq!(
        punch,
        secs(&[500, 1000, 2000, 4000, 8000, 16000, 16000, 16000])
    );
    let forward: Vec<_> = (0..6).map(|n| c.forward_backoff(n)).collect();
    assert_eq!(forward, secs(&[2000, 4000, 8000, 16000, 16000, 16000]));
    assert_eq!(c.punch_backoff(u32::MAX), ms(16000));
    assert_eq!(c.forward_backoff(u32::MAX), ms(16000));
}

#[test]
fn leads_rule_smaller_id_leads() {
    assert!(leads(&[1, 2, 3], &[1, 2, 4]));
    assert!(!leads(&[1, 2, 4], &[1, 2, 3]));
    assert!(!leads(&[7], &[7]));
    // Exactly one of two distinct ids leads.
    let (a, b): (&[u8], &[u8]) = (&[0, 9], &[1]);
    assert!(leads(a, b) ^ leads(b, a));
}

// ----- dialing ----------------------------------------------------------------

#[test]
fn leader_dials_at_once_when_addresses_arrive() {
    let mut s = Sim::dialer();
    s.at(1234).addresses(&[R1], &[]);
    assert_eq!(s.take(), [(1234, dial())]);
}

#[test]
fn no_dial_without_addresses() {
    let mut s = Sim::dialer();
    s.waiting(true).dial_failed();
    assert_eq!(s.timeout(), None);
    s.run_to(10_000);
    assert_eq!(s.take(), []);
    // Addresses that go away stop the cadence.
    s.addresses(&[R1], &[]).run_to(10_600);
    assert_eq!(s.times(&dial()), [10_000, 10_500]);
    s.addresses(&[], &[]);
    assert_eq!(s.timeout(), None);
    s.run_to(20_000);
    assert_eq!(s.take(), []);
}

#[test]
fn follower_waits_patience_before_dialing() {
    let mut s = Sim::follower();
    s.at(100).addresses(&[R1], &[]);
    s.run_to(2099);
    assert_eq!(s.take(), [], "nothing within the follower's patience");
    assert_eq!(s.timeout(), Some(2100));
    s.run_to(3200);
    assert_eq!(s.times(&dial()), [2100, 2600, 3100]);
}

#[test]
fn follower_dials_at_once_when_data_waits() {
    let mut s = Sim::follower();
    s.addresses(&[R1], &[]).at(700).waiting(true);
    s.run_to(1300);
    assert_eq!(s.times(&dial()), [700, 1200]);
}

#[test]
fn follower_with_data_already_waiting_dials_when_addresses_arrive() {
    let mut s = Sim::follower();
    s.waiting(true);
    assert_eq!(s.take(), []);
    s.at(300).addresses(&[R1], &[]);
    assert_eq!(s.take(), [(300, dial())]);
}

#[test]
fn follower_patience_counts_from_the_first_addresses_only() {
    let mut s = Sim::follower();
    s.addresses(&[R1], &[]).at(1000).connected(PathKind::Relay);
    s.at(60_000).disconnected(PathKind::Relay);
    // Patience long spent: the follower redials like the leader.
    assert_eq!(s.take(), [(60_000, dial())]);
}

#[test]
fn each_app_message_while_unconnected_dials_at_once() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[])
        .at(100)
        .waiting(true)
        .at(130)
        .waiting(true);
    s.run_to(700);
    // The app's dials restart the cadence.
    assert_eq!(s.times(&dial()), [0, 100, 130, 630]);
    // Not while connected.
    s.connected(PathKind::Relay).waiting(true);
    assert_eq!(s.take(), []);
}

#[test]
fn redial_every_500ms_while_unconnected() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).run_to(2600);
    assert_eq!(s.times(&dial()), [0, 500, 1000, 1500, 2000, 2500]);
    assert_eq!(s.timeout(), Some(3000));
}

#[test]
fn dial_carries_the_current_relay_addresses() {
    let mut s = Sim::dialer();
    s.addresses(&[R1], &[]).at(200).addresses(&[R1, R2], &[]);
    s.at(200).addresses(&[R1, R2], &[]); // unchanged: no dial
    s.run_to(750);
    let both = Action::Dial(vec![R1, R2]);
    assert_eq!(s.take(), [(0, dial()), (200, both.clone()), (700, both)]);
}

#[test]
fn quick_redials_50_100_200_then_only_the_cadence() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]);
    s.at(10).dial_failed().at(70).dial_failed();
    s.at(180).dial_failed().at(390).dial_failed();
    s.run_to(1390);
    assert_eq!(s.times(&dial()), [0, 60, 170, 380, 880, 1380]);
    // More failures: no more quick redials.
    s.dial_failed().run_to(1881);
    assert_eq!(s.times(&dial()), [1880]);
}

#[test]
fn quick_redial_once_per_failure_pending() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[])
        .at(10)
        .dial_failed()
        .at(20)
        .dial_failed();
    s.run_to(499);
    assert_eq!(
        s.times(&dial()),
        [0, 60],
        "a second failure before the redial adds none"
    );
}

#[test]
fn quick_redials_rearm_after_a_connection() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]);
    for t in [10, 70, 180] {
        s.at(t).dial_failed();
    }
    s.at(400).connected(PathKind::Relay);
    s.at(5000).disconnected(PathKind::Relay);
    s.at(5010).dial_failed().run_to(5100);
    assert_eq!(s.times(&dial()), [0, 60, 170, 380, 5000, 5060]);
}

#[test]
fn failed_dial_while_connected_schedules_nothing() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[])
        .connected(PathKind::Direct)
        .dial_failed();
    assert_eq!(s.timeout(), None);
    s.take();
    s.at(30).disconnected(PathKind::Direct).run_to(800);
    assert_eq!(s.times(&dial()), [500], "the cadence only, no quick redial");
}

#[test]
fn connection_cancels_a_pending_quick_redial() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).at(10).dial_failed();
    s.at(20).connected(PathKind::Relay).run_to(5000);
    assert_eq!(s.times(&dial()), [0]);
}

#[test]
fn no_dial_while_any_connection_is_up() {
    for kind in [PathKind::Relay, PathKind::Direct, PathKind::Forwarded] {
        let mut s = Sim::new(true, false);
        s.addresses(&[R1], &[]).at(100).connected(kind);
        s.run_to(60_000);
        assert_eq!(s.times(&dial()), [0], "{kind:?}");
        assert_eq!(s.timeout(), None, "{kind:?}");
    }
}

#[test]
fn two_relayed_connections_one_lost_still_connected() {
    let mut s = Sim::new(true, false);
    s.addresses(&[R1], &[]).at(100).connected(PathKind::Relay);
    s.at(110).connected(PathKind::Relay);
    s.at(5000).disconnected(PathKind::Relay).run_to(10_000);
    assert_eq!(s.times(&dial()), [0], "one relayed connection is left");
    assert_eq!(s.p.connections(PathKind::Relay), 1);
    s.disconnected(PathKind::Relay).run_to(10_600);
    assert_eq!(s.times(&dial()), [10_000, 10_500]);
}

#[test]
fn disconnect_of_an_unknown_kind_is_ignored() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.at(100)
        .disconnected(PathKind::Direct)
        .disconnected(PathKind::Forwarded);
    assert!(s.p.is_connected());
    s.run_to(5000);
    // No dial but the first.
    assert_eq!(s.times(&dial()), [0]);
}

#[test]
fn lost_connection_redials_no_sooner_than_the_cadence() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).at(100).connected(PathKind::Relay);
    s.at(200).disconnected(PathKind::Relay).run_to(1100);
    assert_eq!(s.times(&dial()), [0, 500, 1000]);
}

#[test]
fn unchanged_addresses_do_not_dial_again() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).at(100).addresses(&[R1], &[]);
    s.at(200).addresses(&[R1], &[F1]); // forwarders changed, relays not
    assert_eq!(s.times(&dial()), [0]);
    s.at(300).addresses(&[R2], &[F1]);
    assert_eq!(s.times(&Action::Dial(vec![R2])), [300]);
}

// ----- punching -------------------------------------------------------------

#[test]
fn the_first_punch_goes_with_the_first_addresses_beside_the_relay_dial() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]);
    assert_eq!(s.take(), [(0, dial()), (0, Action::RequestPunch)]);
    assert_eq!(s.p.punch_attempts(), 1);
    // The relayed connection and its stream change nothing: the next
    // request waits for the backoff.
    s.at(100).connected(PathKind::Relay);
    s.run_to(499);
    assert_eq!(s.take(), []);
    s.run_to(500);
    assert_eq!(s.take(), [(500, Action::RequestPunch)]);
}

#[test]
fn a_group_without_relays_punches_at_once_and_backs_off() {
    let mut s = Sim::leader();
    s.at(30).addresses(&[], &[]);
    assert_eq!(s.take(), [(30, Action::RequestPunch)], "no relay to dial");
    s.run_to(3600);
    assert_eq!(s.times(&Action::RequestPunch), [530, 1530, 3530]);
    // Until a direct connection is up.
    s.connected(PathKind::Direct);
    assert_eq!(s.timeout(), None);
}

#[test]
fn nothing_is_punched_before_the_link_knows_the_peer() {
    let mut s = Sim::leader();
    s.connected(PathKind::Relay);
    s.run_to(60_000);
    assert_eq!(s.take(), []);
    assert_eq!(s.timeout(), None);
}

#[test]
fn no_punch_on_a_direct_stream() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).take();
    s.at(100).connected(PathKind::Direct);
    s.run_to(60_000);
    assert_eq!(s.take(), []);
}

#[test]
fn no_punch_for_the_follower_or_without_control_punch() {
    for (leads, control_punch) in [(false, true), (true, false), (false, false)] {
        let mut s = Sim::new(leads, control_punch);
        s.waiting(true).addresses(&[R1], &[]).take();
        s.at(100).connected(PathKind::Relay);
        assert_eq!(s.timeout(), None, "idle relayed link");
        s.run_to(120_000);
        assert_eq!(s.take(), [], "leads={leads} control_punch={control_punch}");
        assert_eq!(s.p.punch_attempts(), 0);
    }
}

#[test]
fn punch_backoff_doubles_to_16s_with_the_defaults() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]);
    s.connected(PathKind::Relay);
    s.run_to(80_000);
    let t = s.times(&Action::RequestPunch);
    assert_eq!(t[0], 0);
    let gaps: Vec<u64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [500, 1000, 2000, 4000, 8000, 16000, 16000, 16000, 16000]
    );
}

#[test]
fn punch_backoff_is_capped_at_the_max() {
    let config = PolicyConfig {
        punch_backoff_first: ms(1000),
        ..PolicyConfig::default()
    };
    let mut s = Sim::with_config(config, true, true);
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.run_to(150_000);
    let t = s.times(&Action::RequestPunch);
    let gaps: Vec<u64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
}

#[test]
fn no_punch_while_a_direct_connection_is_up() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.run_to(3700);
    assert_eq!(s.times(&Action::RequestPunch), [0, 500, 1500, 3500]);
    s.connected(PathKind::Direct);
    s.at(3800); // a relayed stream: still no punch
    assert_eq!(s.timeout(), None);
    s.run_to(120_000);
    assert_eq!(s.take(), []);
    assert_eq!(s.p.punch_attempts(), 4, "kept until the direct one is lost");
}

#[test]
fn direct_lost_resets_the_backoff_and_punches_at_once() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.run_to(20_000);
    assert_eq!(s.p.punch_attempts(), 6);
    s.connected(PathKind::Direct).take();
    s.at(50_000).disconnected(PathKind::Direct);
    assert_eq!(s.take(), [(50_000, Action::RequestPunch)]);
    assert_eq!(s.p.punch_attempts(), 1);
    s.run_to(51_600);
    assert_eq!(s.times(&Action::RequestPunch), [50_500, 51_500]);
}

#[test]
fn direct_lost_while_another_direct_is_up_punches_nothing() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.connected(PathKind::Direct)
        .connected(PathKind::Direct)
        .take();
    s.at(1000).disconnected(PathKind::Direct).run_to(60_000);
    assert_eq!(s.take(), []);
    s.disconnected(PathKind::Direct);
    assert_eq!(s.take(), [(60_000, Action::RequestPunch)]);
}

#[test]
fn direct_lost_without_a_relay_punches_at_once_beside_the_redial() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.run_to(4000);
    s.connected(PathKind::Direct)
        .at(4100)
        .disconnected(PathKind::Relay);
    s.take();
    s.at(10_000).disconnected(PathKind::Direct);
    // The redial (cadence long spent) and the punch go at once: a direct
    // path needs no relayed one first.
    assert_eq!(s.take(), [(10_000, dial()), (10_000, Action::RequestPunch)]);
    assert_eq!(s.p.punch_attempts(), 1);
    s.at(10_200).connected(PathKind::Relay).at(10_230);
    assert_eq!(s.take(), [], "the backoff holds");
    s.run_to(10_500);
    assert_eq!(s.times(&Action::RequestPunch), [10_500]);
}

#[test]
fn punch_backoff_survives_a_relay_reconnect() {
    // Only a lost direct connection resets the backoff.
    let mut s = Sim::leader();
    s.addresses(&[R1], &[]).connected(PathKind::Relay);
    s.run_to(600);
    assert_eq!(s.times(&Action::RequestPunch), [0, 500]);
    s.disconnected(PathKind::Relay).take();
    s.at(700).connected(PathKind::Relay);
    s.run_to(1600);
    assert_eq!(s.times(&Action::RequestPunch), [1500]);
    assert_eq!(s.p.punch_attempts(), 3);
}

// ----- forwarding -----------------------------------------------------------

#[test]
fn forwarder_dialed_at_once_when_forwarders_arrive_either_side() {
    for leads in [true, false] {
        let mut s = Sim::new(leads, false);
        s.at(100).addresses(&[R1], &[F1, F2]);
        let mut want = vec![(100, Action::DialVia(F1))];
        if leads {
            want.insert(0, (100, dial()));
        }
        assert_eq!(s.take(), want, "leads={leads}");
    }
}

#[test]
fn forwarder_backoff_2_4_8_16s() {
    let mut s = Sim::new(true, false);
    s.addresses(&[R1], &[F1])
        .connected(PathKind::Relay)
        .run_to(70_000);
    let t = s.times(&Action::DialVia(F1));
    assert_eq!(t, [0, 2000, 6000, 14000, 30000, 46000, 62000]);
}

#[test]
fn no_forwarder_dial_while_forwarded_or_direct_is_up() {
    for kind in [PathKind::Forwarded, PathKind::Direct] {
        let mut s = Sim::new(true, false);
        s.addresses(&[R1], &[F1]).take();
        s.at(100).connected(kind).run_to(100_000);
        assert_eq!(s.take(), [], "{kind:?}");
        assert_eq!(s.timeout(), None, "{kind:?}");
    }
}

#[test]
fn forwarded_lost_resets_the_backoff_and_dials_at_once() {
    let mut s = Sim::new(true, false);
    s.addresses(&[R1], &[F1])
        .connected(PathKind::Relay)
        .run_to(15_000);
    assert_eq!(s.p.forward_attempts(), 4);
    s.connected(PathKind::Forwarded).take();
    s.at(40_000)
        .disconnected(PathKind::Forwarded)
        .run_to(48_000);
    assert_eq!(s.times(&Action::DialVia(F1)), [40_000, 42_000, 46_000]);
}

#[test]
fn direct_lost_dials_the_forwarder_without_resetting_its_backoff() {
    let mut s = Sim::new(true, false);
    s.addresses(&[R1], &[F1])
        .connected(PathKind::Relay)
        .run_to(7000);
    assert_eq!(s.times(&Action::DialVia(F1)), [0, 2000, 6000]);
    s.connected(PathKind::Direct)
        .at(9000)
        .disconnected(PathKind::Direct);
    s.run_to(30_000);
    // Due at 14 s but the direct connection held it; the backoff goes on.
    assert_eq!(s.times(&Action::DialVia(F1)), [14_000, 30_000]);
}

#[test]
fn best_forwarder_change_resets_the_backoff_and_dials_it() {
    let mut s = Sim::new(true, false);
    s.addresses(&[R1], &[F1])
        .connected(PathKind::Relay)
        .run_to(7000);
    s.take();
    s.addresses(&[R1], &[F1, F2]); // same best: nothing
    assert_eq!(s.take(), []);
    s.at(7500).addresses(&[R1], &[F2, F1]);
    s.run_to(9600);
    assert_eq!(s.times(&Action::DialVia(F2)), [7500, 9500]);
}

// ----- timers -----------------------------------------------------------------

#[test]
fn poll_timeout_none_on_an_idle_direct_link() {
    let mut s = Sim::leader();
    assert_eq!(s.timeout(), None, "fresh");
    s.addresses(&[R1], &[F1]).connected(PathKind::Relay);
    s.at(300).connected(PathKind::Direct);
    assert_eq!(s.timeout(), None);
}

#[test]
fn poll_timeout_is_the_earliest_due_instant() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[F1]);
    assert_eq!(
        s.timeout(),
        Some(500),
        "redial and punch before the forwarder's 2 s"
    );
    s.at(100).dial_failed();
    assert_eq!(s.timeout(), Some(150), "the quick redial");
    s.at(200).connected(PathKind::Relay);
    assert_eq!(s.timeout(), Some(500), "the punch backoff");
    s.run_to(501);
    assert_eq!(s.timeout(), Some(1500));
    s.run_to(1501);
    assert_eq!(s.timeout(), Some(2000), "the forwarder's backoff");
}

#[test]
fn early_wakeup_does_nothing() {
    let mut s = Sim::leader();
    s.addresses(&[R1], &[F1]).connected(PathKind::Relay);
    s.take();
    let due = s.p.poll_timeout().unwrap();
    s.p.handle_timeout(due - ms(1));
    assert_eq!(s.p.poll_action(), None);
    assert_eq!(s.p.poll_timeout(), Some(due));
}

#[test]
fn late_wakeup_acts_once() {
    let mut s = Sim::dialer();
    s.addresses(&[R1], &[]).take();
    // The worker was stalled for 3 s: one dial, not six.
    let late = s.base + ms(3000);
    s.p.handle_timeout(late);
    assert_eq!(s.p.poll_action(), Some(dial()));
    assert_eq!(s.p.poll_action(), None);
    assert_eq!(s.p.poll_timeout(), Some(late + ms(500)));
}

// ----- random event sequences -----------------------------------------------

#[derive(Clone, Debug)]
enum Ev {
    /// Sleep until poll_timeout() repeatedly, up to this many ms later.
    Advance(u64),
    /// A worker that wakes late: jump this many ms, one handle_timeout.
    Late(u64),
    /// A spurious wake-up before anything is due.
    Early,
    Addresses {
        relay: usize,
        forwarded: usize,
        best: bool,
    },
    Connected(PathKind),
    Disconnected(PathKind),
    DialFailed,
    Waiting(bool),
}

fn kind() -> impl Strategy<Value = PathKind> {
    prop_oneof![
        Just(PathKind::Relay),
        Just(PathKind::Direct),
        Just(PathKind::Forwarded)
    ]
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (1u64..20_000).prop_map(Ev::Advance),
        2 => (1u64..600).prop_map(Ev::Advance),
        1 => (1u64..5_000).prop_map(Ev::Late),
        1 => Just(Ev::Early),
        2 => (0usize..3, 0usize..3, any::<bool>())
            .prop_map(|(relay, forwarded, best)| Ev::Addresses { relay, forwarded, best }),
        3 => kind().prop_map(Ev::Connected),
        3 => kind().prop_map(Ev::Disconnected),
        2 => Just(Ev::DialFailed),
        1 => any::<bool>().prop_map(Ev::Waiting),
    ]
}

/// What the test knows independently of the policy.
struct Model {
    leads: bool,
    control_punch: bool,
    relay: Vec<Addr>,
    forwarded: Vec<Addr>,
    conns: [u32; 3],
    ever_waiting: bool,
    /// Whether the link has had addresses (it knows the peer).
    started: bool,
    /// First instant with relay addresses and no connection.
    dial_since: Option<Instant>,
    last_dial: Option<Instant>,
    /// Instants at which a quick redial may fall due.
    quick_times: Vec<Instant>,
    /// (time, attempts since reset) of the last punch request.
    last_punch: Option<(Instant, u32)>,
    last_forward: Option<(Instant, u32)>,
}

fn idx(k: PathKind) -> usize {
    match k {
        PathKind::Relay => 0,
        PathKind::Direct => 1,
        PathKind::Forwarded => 2,
    }
}

impl Model {
    fn connected(&self) -> bool {
        self.conns.iter().sum::<u32>() > 0
    }

    fn wants_punch(&self) -> bool {
        self.leads && self.control_punch && self.started && self.conns[1] == 0
    }

    fn forward_eligible(&self) -> bool {
        !self.forwarded.is_empty() && self.conns[1] == 0 && self.conns[2] == 0
    }

    /// A dial event (new addresses, data queued) must dial at once.
    fn dial_ready(&self, now: Instant, waiting: bool, c: &PolicyConfig) -> bool {
        !self.connected()
            && !self.relay.is_empty()
            && (self.leads
                || waiting
                || self
                    .dial_since
                    .is_some_and(|s| now >= s + c.follower_patience))
    }
}

/// What one call emitted.
#[derive(Default)]
struct Emitted {
    dial: bool,
    punch: bool,
}

struct Checker {
    p: LinkPolicy<Addr>,
    m: Model,
    config: PolicyConfig,
    now: Instant,
}

impl Checker {
    /// Checks every action a call at `now` emitted; `from_timer`: the call
    /// was `handle_timeout` (no event-driven dial).
    fn after_call(&mut self, from_timer: bool) -> Result<Emitted, TestCaseError> {
        let mut emitted = Emitted::default();
        let now = self.now;
        let c = &self.config;
        let m = &mut self.m;
        if !m.connected() && !m.relay.is_empty() {
            m.dial_since.get_or_insert(now);
        }
        while let Some(a) = self.p.poll_action() {
            match a {
                Action::Dial(addrs) => {
                    prop_assert!(!m.connected(), "Dial while connected");
                    prop_assert_eq!(&addrs, &m.relay);
                    prop_assert!(!addrs.is_empty());
                    if !m.leads && !m.ever_waiting {
                        let since = m.dial_since.expect("eligible");
                        prop_assert!(now >= since + c.follower_patience, "follower impatient");
                    }
                    if from_timer {
                        let cadence = m.last_dial.is_none_or(|d| now >= d + c.redial);
                        let quick = m
                            .quick_times
                            .iter()
                            .any(|&q| q <= now && m.last_dial.is_none_or(|d| q > d));
                        prop_assert!(cadence || quick, "timer dial off the cadence");
                    }
                    m.last_dial = Some(now);
                    emitted.dial = true;
                }
                Action::RequestPunch => {
                    prop_assert!(m.leads && m.control_punch);
                    prop_assert!(m.conns[1] == 0, "RequestPunch with a direct connection");
                    prop_assert!(m.started, "RequestPunch before the peer is known");
                    let n = match m.last_punch {
                        Some((t, n)) => {
                            prop_assert!(now >= t + c.punch_backoff(n - 1), "punch backoff");
                            n + 1
                        }
                        None => 1,
                    };
                    m.last_punch = Some((now, n));
                    emitted.punch = true;
                }
                Action::DialVia(addr) => {
                    prop_assert_eq!(Some(&addr), m.forwarded.first());
                    prop_assert!(m.conns[1] == 0 && m.conns[2] == 0);
                    let n = match m.last_forward {
                        Some((t, n)) => {
                            prop_assert!(now >= t + c.forward_backoff(n - 1), "forward backoff");
                            n + 1
                        }
                        None => 1,
                    };
                    m.last_forward = Some((now, n));
                }
            }
        }
        // Timers: never in the past, and present whenever a rule may act.
        let timeout = self.p.poll_timeout();
        prop_assert!(
            timeout.is_none_or(|t| t > now),
            "poll_timeout not after now"
        );
        if m.conns[1] > 0 {
            prop_assert_eq!(timeout, None, "idle direct link wakes");
        }
        if !m.connected() && !m.relay.is_empty() {
            let since = m.dial_since.expect("noted above");
            let patience_end = if m.leads || self.p.waiting() {
                since
            } else {
                since + c.follower_patience
            };
            let limit = (now + c.redial).max(patience_end);
            prop_assert!(timeout.is_some_and(|t| t <= limit), "dial starved");
        }
        if m.wants_punch() {
            let limit = now + c.punch_backoff(u32::MAX);
            prop_assert!(timeout.is_some_and(|t| t <= limit), "punch starved");
        }
        if !m.forwarded.is_empty() && m.conns[1] == 0 && m.conns[2] == 0 {
            let limit = now + c.forward_backoff(u32::MAX);
            prop_assert!(timeout.is_some_and(|t| t <= limit), "forward starved");
        }
        if !m.connected() && m.relay.is_empty() && m.forwarded.is_empty() && !m.wants_punch() {
            prop_assert_eq!(timeout, None, "nothing to do but a timer");
        }
        prop_assert_eq!(self.p.punch_attempts(), m.last_punch.map_or(0, |(_, n)| n));
        // A reset forwarder backoff dials at once.
        if m.forward_eligible() {
            prop_assert!(
                m.last_forward.is_some(),
                "no forwarder dial since the reset"
            );
        }
        Ok(emitted)
    }

    fn step(&mut self, ev: Ev) -> Result<(), TestCaseError> {
        match ev {
            Ev::Advance(d) => {
                let end = self.now + ms(d);
                while let Some(due) = self.p.poll_timeout() {
                    if due > end {
                        break;
                    }
                    self.now = due;
                    self.p.handle_timeout(due);
                    let e = self.after_call(true)?;
                    prop_assert!(
                        e.dial || e.punch || self.m.last_forward.is_some_and(|(t, _)| t == due),
                        "woken for nothing"
                    );
                }
                self.now = end;
            }
            Ev::Late(d) => {
                self.now += ms(d);
                self.p.handle_timeout(self.now);
                self.after_call(true)?;
            }
            Ev::Early => {
                if let Some(due) = self.p.poll_timeout() {
                    let early = self.now + (due - self.now) / 2;
                    if early > self.now {
                        self.now = early;
                    }
                }
                self.p.handle_timeout(self.now);
                prop_assert_eq!(self.p.poll_action(), None, "action before its due time");
            }
            Ev::Addresses {
                relay,
                forwarded,
                best,
            } => {
                let relay = [R1, R2][..relay.min(2)].to_vec();
                let order = if best { [F1, F2] } else { [F2, F1] };
                let forwarded = order[..forwarded.min(2)].to_vec();
                if self.m.forwarded.first() != forwarded.first() {
                    self.m.last_forward = None;
                }
                let changed = self.m.relay != relay;
                let first = !self.m.started;
                self.m.relay = relay.clone();
                self.m.forwarded = forwarded.clone();
                self.m.started = true;
                self.p.set_addresses(relay, forwarded, self.now);
                let ready = self.m.dial_ready(self.now, self.p.waiting(), &self.config);
                let e = self.after_call(false)?;
                if changed && ready {
                    prop_assert!(e.dial, "new addresses not dialed");
                }
                if first && self.m.wants_punch() {
                    prop_assert!(e.punch, "no punch with the first addresses");
                }
            }
            Ev::Connected(k) => {
                self.m.conns[idx(k)] += 1;
                self.m.quick_times.clear();
                self.p.connected(k, self.now);
                self.after_call(false)?;
            }
            Ev::Disconnected(k) => {
                let direct_lost = k == PathKind::Direct && self.m.conns[1] > 0;
                if self.m.conns[idx(k)] > 0 {
                    self.m.conns[idx(k)] -= 1;
                    match k {
                        PathKind::Direct => self.m.last_punch = None,
                        PathKind::Forwarded => self.m.last_forward = None,
                        PathKind::Relay => {}
                    }
                }
                self.p.disconnected(k, self.now);
                let e = self.after_call(false)?;
                if direct_lost && self.m.wants_punch() {
                    prop_assert!(e.punch, "no punch at once after the direct loss");
                }
            }
            Ev::DialFailed => {
                let c = &self.config;
                self.m
                    .quick_times
                    .extend((0..c.quick_redials).map(|n| self.now + c.quick_redial_wait(n)));
                self.p.dial_failed(self.now);
                self.after_call(false)?;
            }
            Ev::Waiting(w) => {
                self.m.ever_waiting |= w;
                self.p.set_waiting(w, self.now);
                let ready = w && self.m.dial_ready(self.now, true, &self.config);
                let e = self.after_call(false)?;
                if ready {
                    prop_assert!(e.dial, "queued data not dialed");
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        leads in any::<bool>(),
        control_punch in any::<bool>(),
        evs in proptest::collection::vec(ev(), 1..80),
    ) {
        let config = PolicyConfig::default();
        let now = Instant::now();
        let mut c = Checker {
            p: LinkPolicy::new(config.clone(), leads, control_punch),
            m: Model {
                leads,
                control_punch,
                relay: Vec::new(),
                forwarded: Vec::new(),
                conns: [0; 3],
                ever_waiting: false,
                started: false,
                dial_since: None,
                last_dial: None,
                quick_times: Vec::new(),
                last_punch: None,
                last_forward: None,
            },
            config,
            now,
        };
        for ev in evs {
            c.step(ev)?;
        }
    }

    /// A follower with no data waiting does nothing but forwarder dials in
    /// its first two seconds with addresses.
    #[test]
    fn quiet_follower_only_dials_forwarders_at_first(
        control_punch in any::<bool>(),
        evs in proptest::collection::vec(ev(), 1..60),
    ) {
        let base = Instant::now();
        let mut p = LinkPolicy::new(PolicyConfig::default(), false, control_punch);
        p.set_addresses(vec![R1], vec![F1], base);
        let mut now = base;
        let end = base + FOLLOWER_PATIENCE;
        let mut conns = [0u32; 3];
        for ev in evs {
            match ev {
                Ev::Advance(d) | Ev::Late(d) => now = (now + ms(d / 8)).min(end - ms(1)),
                Ev::Connected(k) => { conns[idx(k)] += 1; p.connected(k, now) }
                Ev::Disconnected(k) => {
                    conns[idx(k)] = conns[idx(k)].saturating_sub(1);
                    p.disconnected(k, now)
                }
                Ev::DialFailed => p.dial_failed(now),
                Ev::Early | Ev::Addresses { .. } | Ev::Waiting(_) => {}
            }
            p.handle_timeout(now);
            while let Some(a) = p.poll_action() {
                prop_assert_eq!(a, Action::DialVia(F1));
            }
        }
        prop_assert!(now < end);
    }
}
