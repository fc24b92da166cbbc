//! The autoscaler's policy (the production `autoscale::policy`) on load curves, in virtual
//! time: 2 s scrape ticks, the default windows (60 s stable, 6 s panic), 8 requests in
//! flight per replica, 300 s scale-down delay, 1 to 10 replicas. Prints how long a load step
//! takes to be answered, how far replicas stray from the ideal (the fewest that keep each
//! replica at its target), and how many changes a noisy flat load causes; draws the burst
//! and the ramp into docs/autoscaling.svg.
//!
//!     cargo bench -p kandle-operator --bench autoscale
use kandle_operator::autoscale::policy::{Bounds, Sample, State, Windows};
use plotters::prelude::*;
use std::time::Duration;

const TICK: f64 = 2.0;
const TARGET: f64 = 8.0;

struct Point {
    t: f64,
    replicas: i32,
    ideal: i32,
}

fn bounds() -> Bounds {
    Bounds {
        min: 1,
        max: 10,
        target: TARGET,
        scale_down_delay: Duration::from_secs(300),
    }
}

fn ideal(load: f64) -> i32 {
    ((load / TARGET).ceil() as i32).clamp(1, 10)
}

fn simulate(start: i32, seconds: f64, load: impl Fn(f64) -> f64) -> Vec<Point> {
    let (bounds, windows) = (bounds(), Windows::default());
    let mut state = State::new(start, Duration::ZERO);
    let mut points = Vec::new();
    let mut t = TICK;
    while t <= seconds {
        let offered = load(t);
        let sample = Sample {
            at: Duration::from_secs_f64(t),
            load: offered,
            answered: 1,
            ready: 1,
        };
        let replicas = state.observe(&bounds, &windows, sample).replicas;
        points.push(Point {
            t,
            replicas,
            ideal: ideal(offered),
        });
        t += TICK;
    }
    points
}

/// Seconds from `from` until replicas first reach `n`.
fn time_to(points: &[Point], from: f64, n: i32) -> f64 {
    points
        .iter()
        .find(|p| p.t >= from && p.replicas >= n)
        .map_or(f64::INFINITY, |p| p.t - from)
}

/// Replica-seconds below and above the ideal.
fn stray(points: &[Point]) -> (f64, f64) {
    points.iter().fold((0.0, 0.0), |(under, over), p| {
        let d = f64::from(p.replicas - p.ideal) * TICK;
        (under + (-d).max(0.0), over + d.max(0.0))
    })
}

fn changes(points: &[Point]) -> usize {
    points
        .windows(2)
        .filter(|w| w[0].replicas != w[1].replicas)
        .count()
}

fn main() {
    // A step the stable window handles (1.5 times the capacity, under the panic
    // threshold): 12 -> 20 in flight, 2 -> 3 replicas.
    let step = simulate(2, 600.0, |t| if t < 120.0 { 12.0 } else { 20.0 });
    // A burst the panic window catches: 8 -> 80 (1 -> 10) for two minutes, then back.
    let burst_load = |t: f64| {
        if (60.0..180.0).contains(&t) {
            80.0
        } else {
            8.0
        }
    };
    let burst = simulate(1, 900.0, burst_load);
    // A ramp: 8 -> 80 over ten minutes, five at the top, then down over ten.
    let ramp_load = |t: f64| match t {
        t if t < 600.0 => 8.0 + 72.0 * t / 600.0,
        t if t < 900.0 => 80.0,
        t => (80.0 - 72.0 * (t - 900.0) / 600.0).max(8.0),
    };
    let ramp = simulate(1, 2100.0, ramp_load);
    // A flat load with noise: 20 +- 6 in flight (3 replicas) for an hour.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<f64> = (0..2000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 13) as f64 - 6.0
        })
        .collect();
    let noisy = simulate(3, 3600.0, |t| 20.0 + noise[(t / TICK) as usize]);

    println!(
        "autoscaler policy, virtual time: {TICK} s ticks, 60 s stable / 6 s panic windows, target {TARGET}, 300 s delay"
    );
    println!(
        "step 12 -> 20 in flight: 3 replicas requested {:.0} s after the step",
        time_to(&step, 120.0, 3)
    );
    println!(
        "burst 8 -> 80: 10 replicas requested {:.0} s after it began; back to 1 {:.0} s after it ended",
        time_to(&burst, 60.0, 10),
        burst
            .iter()
            .find(|p| p.t >= 180.0 && p.replicas == 1)
            .map_or(f64::INFINITY, |p| p.t - 180.0)
    );
    for (name, points) in [("burst", &burst), ("ramp", &ramp)] {
        let (under, over) = stray(points);
        let ideal: f64 = points.iter().map(|p| f64::from(p.ideal) * TICK).sum();
        println!(
            "{name}: {:.1}% of the ideal replica-seconds short, {:.1}% over (scale-down delay), {} changes",
            100.0 * under / ideal,
            100.0 * over / ideal,
            changes(points)
        );
    }
    println!(
        "noisy flat load 20 +- 6 for an hour: {} scaling changes",
        changes(&noisy)
    );
    plot(&[
        ("burst: 8 -> 80 -> 8 in flight", &burst),
        ("ramp: 8 -> 80 -> 8 in flight", &ramp),
    ])
    .expect("the plot is written");
}

fn plot(panels: &[(&str, &Vec<Point>)]) -> Result<(), Box<dyn std::error::Error>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/autoscaling.svg");
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (title, points)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let end = points.last().map_or(1.0, |p| p.t);
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..end, 0.0..11.0)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("replicas")
            .draw()?;
        let steps = |f: fn(&Point) -> i32| {
            points
                .windows(2)
                .flat_map(move |w| [(w[0].t, f64::from(f(&w[0]))), (w[1].t, f64::from(f(&w[0])))])
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(steps(|p| p.ideal), BLUE.stroke_width(1)))?
            .label("ideal: load / target, rounded up")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(steps(|p| p.replicas), RED.stroke_width(2)))?
            .label("kandle's autoscaler")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    println!("plot: docs/autoscaling.svg");
    Ok(())
}
