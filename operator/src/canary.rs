//! Canary rollouts (`spec.rollout.canary`), as pure decisions.
//!
//! A new revision first runs beside the last Ready one (`status.readySpec`) under the same
//! Service, in a second Deployment (`NAME-canary`) holding the step's share of the
//! replicas. When a step's pause is over and the canary's pods are ready, the 5xx share of
//! the requests each revision answered during the step is compared with `maxErrorRate`:
//! above it the canary is aborted (the old revision serves alone and the spec is not tried
//! again until it changes); otherwise the next step begins, and after the last one the new
//! revision is promoted and rolled out as usual. Steps, their baselines and the verdict live
//! in `status.canary`, so a restarted operator carries on where it was.
use crate::crd::{CanaryCounters, CanaryStatus, CanaryVerdict, ModelDeployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use std::time::Duration;

pub use kandle_contract::keys::CANARY_ANNOTATION as ANNOTATION;

/// What to deploy for a ModelDeployment with `rollout.canary`.
#[derive(Debug, Clone, PartialEq)]
pub enum Canary {
    /// Stable and canary side by side.
    Running {
        status: CanaryStatus,
        stable_replicas: i32,
        canary_replicas: i32,
        /// When to look again.
        recheck: Duration,
    },
    /// The old revision alone, at full strength.
    Aborted(CanaryStatus),
    /// The new revision, rolled out as usual; the canary's pods serve until it is.
    Promoted(CanaryStatus),
}

/// The canary decision for the spec's `revision`, or `None` when no canary applies (no
/// `rollout.canary`, nothing Ready to compare with, or the revision already serves).
/// `counters` are what the pods report now, summed per revision.
pub fn decide(
    md: &ModelDeployment,
    revision: &str,
    replicas: i32,
    canary_ready: bool,
    counters: Option<CanaryCounters>,
    now: &Time,
) -> Option<Canary> {
    let spec = md.spec.rollout.as_ref()?.canary.as_ref()?;
    let status = md.status.as_ref()?;
    status.ready_spec.as_ref()?;
    if status.current_revision.as_deref() == Some(revision) {
        return None;
    }
    let generation = md.metadata.generation.unwrap_or_default();
    let previous = status
        .canary
        .clone()
        .filter(|c| c.revision == revision && c.generation == generation);
    let mut current = match previous {
        Some(c) if c.verdict == CanaryVerdict::Aborted => return Some(Canary::Aborted(c)),
        Some(c) if c.verdict == CanaryVerdict::Promoted => return Some(Canary::Promoted(c)),
        Some(c) => c,
        None => step(
            revision,
            generation,
            spec.steps[0].weight,
            0,
            now,
            counters,
            "".into(),
        ),
    };
    let total = spec.steps.len() as i32;
    if current.message.is_empty() {
        current.message = format!("step 1 of {total}: canary at {}%", current.weight);
    }
    match md.annotations().get(ANNOTATION).map(String::as_str) {
        Some("promote") => {
            return Some(verdict(
                current,
                CanaryVerdict::Promoted,
                "promoted by the kandle.dev/canary annotation".into(),
            ));
        }
        Some("abort") => {
            return Some(verdict(
                current,
                CanaryVerdict::Aborted,
                "aborted by the kandle.dev/canary annotation".into(),
            ));
        }
        _ => {}
    }
    let pause = Duration::from_secs(spec.steps[current.step as usize].pause_seconds.max(0) as u64);
    let elapsed =
        Duration::from_secs((now.0.as_second() - current.step_started.0.as_second()).max(0) as u64);
    let running = |status: CanaryStatus, recheck: Duration| {
        let (stable_replicas, canary_replicas) = split(replicas, status.weight);
        Some(Canary::Running {
            stable_replicas,
            canary_replicas,
            status,
            recheck,
        })
    };
    if elapsed < pause {
        return running(current, pause - elapsed);
    }
    let (Some(now_counters), true) = (counters, canary_ready) else {
        // Its pods are not all ready yet, or did not report: look again shortly.
        return running(current, Duration::from_secs(2));
    };
    let rate = |requests: f64, errors: f64, base_requests: f64, base_errors: f64| {
        let r = (requests - base_requests).max(0.0);
        let e = (errors - base_errors).max(0.0).min(r);
        (r, if r > 0.0 { e / r } else { 0.0 })
    };
    let b = current.baseline;
    let (canary_requests, canary_rate) = rate(
        now_counters.canary_requests,
        now_counters.canary_errors,
        b.canary_requests,
        b.canary_errors,
    );
    let (stable_requests, stable_rate) = rate(
        now_counters.stable_requests,
        now_counters.stable_errors,
        b.stable_requests,
        b.stable_errors,
    );
    let measured = format!(
        "canary error rate {:.1}% over {canary_requests:.0} requests, stable {:.1}% over {stable_requests:.0}",
        canary_rate * 100.0,
        stable_rate * 100.0
    );
    if canary_rate > spec.max_error_rate {
        let why = format!(
            "step {} of {total}: {measured}, above the {:.1}% allowed",
            current.step + 1,
            spec.max_error_rate * 100.0
        );
        return Some(verdict(current, CanaryVerdict::Aborted, why));
    }
    if current.step + 1 >= total {
        let why = format!("step {total} of {total}: {measured}; promoted");
        return Some(verdict(current, CanaryVerdict::Promoted, why));
    }
    let next = current.step + 1;
    let weight = spec.steps[next as usize].weight;
    let message = format!(
        "step {} of {total}: canary at {weight}% (step {} passed: {measured})",
        next + 1,
        next
    );
    let status = step(
        revision,
        generation,
        weight,
        next,
        now,
        Some(now_counters),
        message,
    );
    let pause = Duration::from_secs(spec.steps[next as usize].pause_seconds.max(0) as u64);
    running(status, pause)
}

/// Stable and canary replicas for a canary `weight` (percent) of `replicas`: the canary
/// gets at least one pod, and so does the stable revision.
pub fn split(replicas: i32, weight: i32) -> (i32, i32) {
    let canary = ((replicas * weight + 99) / 100).clamp(1, replicas.max(1));
    ((replicas - canary).max(1), canary)
}

fn step(
    revision: &str,
    generation: i64,
    weight: i32,
    step: i32,
    now: &Time,
    counters: Option<CanaryCounters>,
    message: String,
) -> CanaryStatus {
    CanaryStatus {
        revision: revision.into(),
        generation,
        step,
        weight,
        step_started: now.clone(),
        verdict: CanaryVerdict::Progressing,
        message,
        baseline: counters.unwrap_or_default(),
    }
}

fn verdict(mut status: CanaryStatus, verdict: CanaryVerdict, message: String) -> Canary {
    status.verdict = verdict;
    status.message = message;
    match verdict {
        CanaryVerdict::Aborted => Canary::Aborted(status),
        _ => Canary::Promoted(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::md;
    use serde_json::json;

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    /// A ModelDeployment whose revision "a" was Ready, with a two-step canary.
    fn model(canary: Option<CanaryStatus>) -> ModelDeployment {
        let mut m = md(json!({"model": {"uri": "hf://o/m"}, "replicas": 4,
            "rollout": {"canary": {"steps": [{"weight": 25, "pauseSeconds": 60},
                                             {"weight": 50, "pauseSeconds": 60}],
                                   "maxErrorRate": 0.05}}}));
        m.metadata.generation = Some(2);
        m.status = Some(crate::crd::ModelDeploymentStatus {
            current_revision: Some("a".into()),
            ready_spec: Some(Box::new(m.spec.clone())),
            canary,
            ..Default::default()
        });
        m
    }

    fn counters(canary: (f64, f64), stable: (f64, f64)) -> Option<CanaryCounters> {
        Some(CanaryCounters {
            canary_requests: canary.0,
            canary_errors: canary.1,
            stable_requests: stable.0,
            stable_errors: stable.1,
        })
    }

    fn running(c: Option<Canary>) -> (CanaryStatus, i32, i32, Duration) {
        match c {
            Some(Canary::Running {
                status,
                stable_replicas,
                canary_replicas,
                recheck,
            }) => (status, stable_replicas, canary_replicas, recheck),
            other => panic!("not running: {other:?}"),
        }
    }

    #[test]
    fn a_new_revision_starts_at_the_first_weight_and_waits_its_pause() {
        let base = counters((0.0, 0.0), (500.0, 1.0));
        let (status, stable, canary, recheck) =
            running(decide(&model(None), "b", 4, false, base, &at(0)));
        assert_eq!((status.step, status.weight, stable, canary), (0, 25, 3, 1));
        assert_eq!(status.baseline, base.unwrap());
        assert_eq!(recheck, Duration::from_secs(60));
        let (_, _, _, recheck) = running(decide(&model(Some(status)), "b", 4, true, base, &at(45)));
        assert_eq!(recheck, Duration::from_secs(15));
    }

    #[test]
    fn healthy_steps_advance_then_promote() {
        let (first, ..) = running(decide(
            &model(None),
            "b",
            4,
            false,
            counters((0.0, 0.0), (0.0, 0.0)),
            &at(0),
        ));
        let now = counters((100.0, 1.0), (300.0, 0.0));
        let (second, stable, canary, _) =
            running(decide(&model(Some(first)), "b", 4, true, now, &at(60)));
        assert_eq!((second.step, second.weight, stable, canary), (1, 50, 2, 2));
        assert!(
            second
                .message
                .contains("canary error rate 1.0% over 100 requests"),
            "{}",
            second.message
        );
        assert_eq!(second.baseline, now.unwrap());
        let later = counters((300.0, 3.0), (500.0, 0.0));
        match decide(&model(Some(second)), "b", 4, true, later, &at(120)) {
            Some(Canary::Promoted(s)) => assert_eq!(s.verdict, CanaryVerdict::Promoted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_many_errors_abort_and_the_abort_holds_for_the_generation() {
        let (first, ..) = running(decide(
            &model(None),
            "b",
            4,
            false,
            counters((0.0, 0.0), (0.0, 0.0)),
            &at(0),
        ));
        let bad = counters((100.0, 20.0), (300.0, 0.0));
        let Some(Canary::Aborted(aborted)) =
            decide(&model(Some(first)), "b", 4, true, bad, &at(60))
        else {
            panic!("not aborted")
        };
        assert!(
            aborted.message.contains("canary error rate 20.0%"),
            "{}",
            aborted.message
        );
        let mut m = model(Some(aborted.clone()));
        assert_eq!(
            decide(&m, "b", 4, true, bad, &at(600)),
            Some(Canary::Aborted(aborted))
        );
        m.metadata.generation = Some(3);
        assert!(matches!(
            decide(&m, "b", 4, true, bad, &at(600)),
            Some(Canary::Running { .. })
        ));
    }

    #[test]
    fn unready_or_silent_canaries_are_not_judged() {
        let (first, ..) = running(decide(&model(None), "b", 4, false, None, &at(0)));
        let (same, ..) = running(decide(
            &model(Some(first.clone())),
            "b",
            4,
            false,
            counters((9.0, 9.0), (0.0, 0.0)),
            &at(90),
        ));
        assert_eq!(same.step, 0);
        let (same, ..) = running(decide(&model(Some(first)), "b", 4, true, None, &at(90)));
        assert_eq!(same.step, 0);
    }

    #[test]
    fn the_annotation_decides_and_no_canary_without_something_ready() {
        let mut m = model(None);
        m.metadata.annotations = Some([(ANNOTATION.to_string(), "abort".to_string())].into());
        assert!(matches!(
            decide(&m, "b", 4, false, None, &at(0)),
            Some(Canary::Aborted(_))
        ));
        assert_eq!(
            decide(&model(None), "a", 4, false, None, &at(0)),
            None,
            "already serving"
        );
        let mut first = model(None);
        first.status.as_mut().unwrap().ready_spec = None;
        assert_eq!(
            decide(&first, "b", 4, false, None, &at(0)),
            None,
            "a first rollout"
        );
    }
}
