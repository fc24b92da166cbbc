//! The Kubernetes events kandle publishes, as pure functions of what was decided: phase
//! changes (with their cause), new revisions rolling out, rollbacks, canary steps, the
//! autoscaler's changes (with the numbers behind them), a model pulled (from where, how
//! long), the GPU fallback and invalid specs.
use crate::crd::{CanaryVerdict, ModelDeployment, ModelDeploymentStatus, Phase};
use crate::rollout::Fallback;
use kube::runtime::events::{Event, EventType};

/// The parts of a status that events are published for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Announced {
    phase: Option<Phase>,
    revision: Option<String>,
    replicas: Option<i32>,
    rolled_back: Option<String>,
    canary: Option<(String, i32, CanaryVerdict)>,
    /// The pulled model's source and revision.
    model: Option<(Option<String>, Option<String>)>,
}

impl Announced {
    pub fn of(s: &ModelDeploymentStatus) -> Self {
        Self {
            phase: s.phase,
            revision: s.update_revision.clone(),
            replicas: s.desired_replicas,
            rolled_back: s.rolled_back.as_ref().map(|r| r.revision.clone()),
            canary: s
                .canary
                .as_ref()
                .map(|c| (c.revision.clone(), c.step, c.verdict)),
            model: s
                .model
                .as_ref()
                .map(|m| (m.source.clone(), m.resolved_revision.clone())),
        }
    }
}

/// The events for `status` replacing what was last announced (`before`).
pub fn transitions(
    md: &ModelDeployment,
    before: Announced,
    status: &ModelDeploymentStatus,
) -> Vec<Event> {
    let Announced {
        phase,
        revision,
        replicas,
        rolled_back,
        canary,
        model,
    } = before;
    let mut events = Vec::new();
    if let Some(m) = &status.model
        && let Some(seconds) = m.pull_seconds
        && model != Some((m.source.clone(), m.resolved_revision.clone()))
    {
        let revision = m
            .resolved_revision
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        events.push(Event {
            type_: EventType::Normal,
            reason: "ModelPulled".into(),
            note: Some(truncate_note(&format!(
                "{}{revision}: {} bytes in {seconds} s, {} of them over the network",
                m.source.as_deref().unwrap_or_default(),
                m.size_bytes.unwrap_or_default(),
                m.pulled_bytes.unwrap_or_default(),
            ))),
            action: "Pull".into(),
            secondary: None,
        });
    }
    if revision.is_some() && revision != status.update_revision {
        events.push(Event {
            type_: EventType::Normal,
            reason: "RolloutStarted".into(),
            note: Some(format!(
                "revision {} replaces {}",
                status.update_revision.clone().unwrap_or_default(),
                revision.unwrap_or_default()
            )),
            action: "Rollout".into(),
            secondary: None,
        });
    }
    if phase != status.phase
        && let Some(phase) = status.phase
    {
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        events.push(Event {
            type_: if matches!(phase, Phase::Degraded | Phase::Failed) {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: format!("{phase:?}"),
            note: ready.map(|c| truncate_note(&format!("{}: {}", c.reason, c.message))),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(rb) = &status.rolled_back
        && rolled_back.as_ref() != Some(&rb.revision)
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: "RolledBack".into(),
            note: Some(truncate_note(&format!(
                "revision {} made no progress ({}); back to revision {}",
                rb.revision,
                rb.message,
                status.update_revision.clone().unwrap_or_default()
            ))),
            action: "Rollback".into(),
            secondary: None,
        });
    }
    if let Some(c) = &status.canary
        && canary != Some((c.revision.clone(), c.step, c.verdict))
    {
        let (type_, reason) = match c.verdict {
            CanaryVerdict::Progressing => (EventType::Normal, "CanaryStep"),
            CanaryVerdict::Promoted => (EventType::Normal, "CanaryPromoted"),
            CanaryVerdict::Aborted => (EventType::Warning, "CanaryAborted"),
        };
        events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(truncate_note(&format!(
                "revision {}: {}",
                c.revision, c.message
            ))),
            action: "Canary".into(),
            secondary: None,
        });
    }
    if let (Some(from), Some(to)) = (replicas, status.desired_replicas)
        && from != to
        && md.spec.autoscaling.is_some()
    {
        let why = status.conditions.iter().find(|c| c.type_ == "Autoscaled");
        events.push(Event {
            type_: EventType::Normal,
            reason: if to > from { "ScaledUp" } else { "ScaledDown" }.into(),
            note: Some(truncate_note(&format!(
                "from {from} to {to} replicas: {}",
                why.map(|c| c.message.as_str()).unwrap_or_default()
            ))),
            action: "Scale".into(),
            secondary: None,
        });
    }
    events
}

/// The rollout replaces one pod at a time for want of a GPU.
pub fn gpu_fallback(f: &Fallback, revision: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: "GPUFallback".into(),
        note: Some(truncate_note(&format!(
            "no free GPU for a surge pod ({}): replacing one pod at a time until revision {revision} is rolled out",
            f.message
        ))),
        action: "Rollout".into(),
        secondary: None,
    }
}

/// A ModelDeployment that does not decode, and why.
pub fn invalid_spec(message: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: "InvalidSpec".into(),
        note: Some(truncate_note(message)),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// Notes are bounded: the API server refuses longer ones.
fn truncate_note(s: &str) -> String {
    s.chars().take(1000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelStatus;

    #[test]
    fn a_pull_is_announced_once_per_source_and_revision_with_its_cost() {
        let md = crate::build::tests::md(serde_json::json!({"model": {"uri": "oci://r/m:v1"}}));
        let status = |revision: &str| ModelDeploymentStatus {
            model: Some(ModelStatus {
                source: Some("oci://r/m:v1".into()),
                resolved_revision: Some(revision.into()),
                pull_seconds: Some(12),
                pulled_bytes: Some(0),
                size_bytes: Some(1 << 30),
                ..ModelStatus::default()
            }),
            ..ModelDeploymentStatus::default()
        };
        let pulled = |before: Announced, s: &ModelDeploymentStatus| {
            transitions(&md, before, s)
                .into_iter()
                .filter(|e| e.reason == "ModelPulled")
                .filter_map(|e| e.note)
                .collect::<Vec<_>>()
        };
        let first = status("sha256:aa");
        assert_eq!(
            pulled(Announced::default(), &first),
            ["oci://r/m:v1 (sha256:aa): 1073741824 bytes in 12 s, 0 of them over the network"]
        );
        assert!(pulled(Announced::of(&first), &first).is_empty());
        assert_eq!(pulled(Announced::of(&first), &status("sha256:bb")).len(), 1);
    }
}
