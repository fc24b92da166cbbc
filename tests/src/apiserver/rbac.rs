//! RBAC for the operator's requests: the rules the Helm chart grants its service account
//! (`charts/kandle/files/rbac.yaml`), enforced on every request of a client made with
//! [`super::ApiServer::client_as`], so a scenario fails with 403 Forbidden when the
//! operator needs a permission the chart does not give.
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;
use std::path::Path;

/// What one service account may do: rules granted everywhere (a ClusterRole) or in one
/// namespace (a Role).
#[derive(Debug, Clone)]
pub struct Policy {
    user: String,
    grants: Vec<(Option<String>, PolicyRule)>,
}

/// One request as RBAC sees it.
#[derive(Debug)]
pub struct Access<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `plural` or `plural/subresource`.
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChartRules {
    watched: Vec<PolicyRule>,
    leader_election: Vec<PolicyRule>,
    gateway: Vec<PolicyRule>,
    node_cache: Vec<PolicyRule>,
}

fn chart_rules() -> ChartRules {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kandle/files/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("the chart's rbac.yaml");
    serde_saphyr::from_str(&text).expect("rbac.yaml parses")
}

impl Policy {
    /// `rules` granted everywhere to `user`.
    pub fn cluster_wide(user: &str, rules: Vec<PolicyRule>) -> Self {
        Self {
            user: user.into(),
            grants: rules.into_iter().map(|r| (None, r)).collect(),
        }
    }

    /// The chart's rules as installed with its defaults: the watched rules cluster-wide and
    /// the Lease rules in `release_namespace`.
    pub fn chart(release_namespace: &str) -> Self {
        let rules = chart_rules();
        let mut grants: Vec<_> = rules.watched.into_iter().map(|r| (None, r)).collect();
        grants.extend(
            rules
                .leader_election
                .into_iter()
                .map(|r| (Some(release_namespace.to_string()), r)),
        );
        Self {
            user: format!("system:serviceaccount:{release_namespace}:kandle"),
            grants,
        }
    }

    /// The rules the chart grants the gateway, cluster-wide.
    pub fn chart_gateway(release_namespace: &str) -> Self {
        Self::cluster_wide(
            &format!("system:serviceaccount:{release_namespace}:kandle-gateway"),
            chart_rules().gateway,
        )
    }

    /// The rules the chart grants the node cache's DaemonSet, cluster-wide.
    pub fn chart_node_cache(release_namespace: &str) -> Self {
        Self::cluster_wide(
            &format!("system:serviceaccount:{release_namespace}:kandle-node-cache"),
            chart_rules().node_cache,
        )
    }

    pub fn allows(&self, access: &Access) -> bool {
        self.grants.iter().any(|(scope, rule)| {
            let in_scope = scope
                .as_deref()
                .is_none_or(|ns| access.namespace == Some(ns));
            let has = |list: &Option<Vec<String>>, want: &str| {
                list.as_ref().is_some_and(|l| l.iter().any(|x| x == want))
            };
            in_scope
                && has(&rule.api_groups, access.group)
                && has(&rule.resources, access.resource)
                && rule.verbs.iter().any(|v| v == access.verb)
        })
    }

    /// The API server's wording, which `kubectl` users know.
    pub fn forbidden(&self, access: &Access) -> String {
        let place = access
            .namespace
            .map(|ns| format!(" in the namespace \"{ns}\""))
            .unwrap_or_else(|| " at the cluster scope".into());
        format!(
            "User \"{}\" cannot {} resource \"{}\" in API group \"{}\"{place}",
            self.user, access.verb, access.resource, access.group
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        ns: Option<&'a str>,
    ) -> Access<'a> {
        Access {
            verb,
            group,
            resource,
            namespace: ns,
        }
    }

    #[test]
    fn grants_only_what_the_chart_lists() {
        let p = Policy::chart("kandle-system");
        assert!(p.allows(&access("patch", "apps", "deployments", Some("ml"))));
        assert!(p.allows(&access(
            "patch",
            "kandle.dev",
            "modeldeployments/status",
            Some("ml")
        )));
        assert!(p.allows(&access("watch", "kandle.dev", "modeldeployments", None)));
        assert!(!p.allows(&access(
            "patch",
            "kandle.dev",
            "modeldeployments",
            Some("ml")
        )));
        assert!(!p.allows(&access("get", "", "secrets", Some("ml"))));
        assert!(!p.allows(&access("delete", "", "pods", Some("ml"))));
        assert!(p.allows(&access(
            "update",
            "coordination.k8s.io",
            "leases",
            Some("kandle-system")
        )));
        assert!(!p.allows(&access(
            "update",
            "coordination.k8s.io",
            "leases",
            Some("ml")
        )));
        assert!(
            p.forbidden(&access("get", "", "secrets", Some("ml")))
                .contains(
                    "cannot get resource \"secrets\" in API group \"\" in the namespace \"ml\""
                )
        );
    }

    /// A Service applied by `server`'s user: created on the first apply, then changed.
    async fn apply_service_twice(server: &super::super::ApiServer) -> Result<(), kube::Error> {
        use k8s_openapi::api::core::v1::Service;
        use kube::api::{Api, Patch, PatchParams};
        let api: Api<Service> = Api::namespaced(server.client(), "ml");
        let params = PatchParams::apply("kandle").force();
        for port in [80, 81] {
            let service = serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "m", "namespace": "ml"},
                "spec": {"ports": [{"port": port}]},
            });
            api.patch("m", &params, &Patch::Apply(&service)).await?;
        }
        Ok(())
    }

    fn rule(verbs: &[&str]) -> PolicyRule {
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["services".into()]),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        }
    }

    #[tokio::test]
    async fn an_apply_that_creates_is_also_authorised_as_create() {
        let server = super::super::ApiServer::default();
        let patch_only = server.as_user(Policy::cluster_wide("u", vec![rule(&["patch"])]));
        let err = apply_service_twice(&patch_only).await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 403 && s.message.contains("cannot create resource \"services\"")),
            "{err:?}"
        );
        let both = server.as_user(Policy::cluster_wide("u", vec![rule(&["create", "patch"])]));
        apply_service_twice(&both).await.unwrap();
        // Once the object exists, an apply is a patch alone.
        apply_service_twice(&patch_only).await.unwrap();
    }

    #[test]
    fn the_chart_may_create_every_child_it_applies() {
        let p = Policy::chart("kandle-system");
        for (group, resource) in [
            ("apps", "deployments"),
            ("", "services"),
            ("", "persistentvolumeclaims"),
            ("policy", "poddisruptionbudgets"),
            ("batch", "jobs"),
        ] {
            for verb in ["create", "patch"] {
                assert!(
                    p.allows(&access(verb, group, resource, Some("ml"))),
                    "{verb} {resource}"
                );
            }
        }
    }
}
