//! When a file deserves more connections: only while connections are what limits it. A
//! CDN caps each connection, so a second one doubles the pace; on a LAN, or where the disk
//! or the CPU is the limit, it adds nothing but work. So a file starts on one connection,
//! doubles them while it has long enough left, and stops at the first doubling that did not
//! pay. Pure: the caller measures, this decides.
use std::time::Duration;

/// How often the caller measures.
pub const TICK: Duration = Duration::from_millis(500);
/// A file due to finish sooner than this gets no more connections.
const WORTH_SPLITTING: f64 = 1.0;
/// The pace a doubling must reach, over the pace before it, to be worth another.
const PAID_OFF: f64 = 1.3;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Measuring with the connections there are.
    Steady,
    /// Connections were just added at this pace: the next tick's is compared with it.
    Judging { before: f64 },
    /// More connections did not help: none again for this file.
    Done,
}

#[derive(Debug)]
pub struct Pace {
    max: usize,
    received: u64,
    state: State,
}

impl Pace {
    /// For a file that may use up to `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            received: 0,
            state: State::Steady,
        }
    }

    /// Called every TICK with the file's bytes received so far, its open connections and
    /// the bytes it has left; returns how many connections to add.
    pub fn tick(&mut self, received: u64, connections: usize, remaining: u64) -> usize {
        let pace = received.saturating_sub(self.received) as f64 / TICK.as_secs_f64();
        self.received = received;
        match self.state {
            State::Done => return 0,
            State::Judging { before } if pace < before * PAID_OFF => {
                self.state = State::Done;
                return 0;
            }
            State::Judging { .. } | State::Steady => self.state = State::Steady,
        }
        let worth = pace > 0.0 && remaining as f64 / pace > WORTH_SPLITTING;
        let add = connections.min(self.max.saturating_sub(connections));
        if !worth || add == 0 {
            return 0;
        }
        self.state = State::Judging { before: pace };
        add
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a file of `size` bytes whose pace is `per_connection` × connections, capped at
    /// `link`; returns the connections it ends with.
    fn simulate(size: u64, per_connection: f64, link: f64, max: usize) -> usize {
        let mut pace = Pace::new(max);
        let (mut received, mut connections) = (0u64, 1usize);
        while received < size {
            let rate = (per_connection * connections as f64).min(link);
            received = (received + (rate * TICK.as_secs_f64()) as u64).min(size);
            connections += pace.tick(received, connections, size - received);
        }
        connections
    }

    const MIB: f64 = 1024.0 * 1024.0;

    #[test]
    fn a_capped_connection_gets_company_up_to_the_limit() {
        // 5 GiB from a CDN giving 60 MiB/s per connection on a 10 Gb/s link.
        assert_eq!(simulate(5 << 30, 60.0 * MIB, 1200.0 * MIB, 8), 8);
        assert_eq!(simulate(5 << 30, 60.0 * MIB, 1200.0 * MIB, 4), 4);
    }

    #[test]
    fn a_link_one_connection_fills_stops_after_one_try() {
        // One connection already gets the whole link: the first doubling does not pay.
        assert_eq!(simulate(5 << 30, 1000.0 * MIB, 1000.0 * MIB, 8), 2);
        // Two connections fill it: the doubling to four does not pay.
        assert_eq!(simulate(5 << 30, 300.0 * MIB, 600.0 * MIB, 8), 4);
    }

    #[test]
    fn files_about_to_finish_stay_on_one_connection() {
        assert_eq!(simulate(256 << 20, 1000.0 * MIB, 1000.0 * MIB, 8), 1);
        assert_eq!(simulate(20 << 20, 30.0 * MIB, 1000.0 * MIB, 8), 1);
    }

    #[test]
    fn one_connection_is_all_a_file_limited_to_one_gets() {
        assert_eq!(simulate(5 << 30, 60.0 * MIB, 1200.0 * MIB, 1), 1);
    }
}
