//! Condition builders. A condition keeps its `lastTransitionTime` while its status stays
//! the same, so an unchanged world writes an unchanged status.
use crate::autoscale::policy::Decision;
use crate::diagnosis::Cause;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Longest condition message kept; the rest is cut with an ellipsis.
const MAX_MESSAGE: usize = 1024;

/// The condition `type_` with `status` for `cause`, keeping the transition time of the
/// `previous` condition of that type if its status was the same.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    cause: Cause,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let kept = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: cause.reason.into(),
        message: truncate(&cause.message, MAX_MESSAGE),
        observed_generation: generation,
        last_transition_time: kept.unwrap_or_else(|| now.clone()),
    }
}

/// `"True"` or `"False"`.
pub fn truth(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// The `Autoscaled` condition: the numbers behind the autoscaler's last decision.
pub fn autoscaled(target: i32, decision: Option<Decision>) -> (&'static str, Cause) {
    let Some(d) = decision else {
        return (
            "Unknown",
            Cause {
                reason: "NoMetrics",
                message: "no ready pod has reported its load yet".into(),
            },
        );
    };
    let reason = match (d.replicas, d.panicking) {
        (0, _) => "ScaledToZero",
        (_, true) => "Burst",
        _ => "LoadAverage",
    };
    let message = format!(
        "{} replicas for {:.1} requests in flight or queued (stable window average; {:.1} in the panic window), \
         target {target} per replica; {} of {} ready pods reported their load",
        d.replicas, d.stable_load, d.panic_load, d.answered, d.ready
    );
    ("True", Cause { reason, message })
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
