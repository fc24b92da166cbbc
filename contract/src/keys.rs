//! Label and annotation keys the operator sets and reads on its children, and that users
//! and tools (the gateway, `kubectl annotate`) may use.

/// Pod label carrying the hash of the pod template, so revisions can be told apart.
pub const REVISION_LABEL: &str = "kandle.dev/revision";
/// Label of canary pods (and their Deployment's selector).
pub const TRACK_LABEL: &str = "kandle.dev/track";
/// `kubectl annotate mdep NAME kandle.dev/canary=promote` (or `abort`) decides at once.
pub const CANARY_ANNOTATION: &str = "kandle.dev/canary";
/// Hash of what the operator last applied to a child: it tells a field the operator
/// stopped setting (which the API server keeps until applied again) from no change.
pub const APPLIED_HASH_ANNOTATION: &str = "kandle.dev/applied-hash";
