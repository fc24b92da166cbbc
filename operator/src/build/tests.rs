//! The children as users will see them in `kubectl get -o yaml`.
use super::*;
use crate::crd::ModelDeployment;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

pub(crate) fn settings() -> Settings {
    Settings {
        server_image: "kandle-server:test".into(),
        server_image_cuda: "kandle-server-cuda:test".into(),
        cluster_domain: "cluster.local".into(),
        operator_namespace: "kandle-system".into(),
        image_volumes: false,
        node_cache_root: "/var/lib/kandle/models".into(),
    }
}

/// A ModelDeployment as the API server would hand it over: validated, defaulted, with a uid.
pub(crate) fn md(spec: Value) -> ModelDeployment {
    let doc = json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "smollm", "namespace": "ml", "uid": "0000-1111", "generation": 2},
        "spec": spec});
    crate::validate::model_deployment(&doc).expect("a valid fixture")
}

fn children(md: &ModelDeployment) -> Desired {
    desired(md, &settings(), crate::replicas::wanted(md, None))
}

fn deployment(d: &Desired) -> &Deployment {
    d.children
        .iter()
        .find_map(|c| match c {
            Child::Deployment(d) => Some(d.as_ref()),
            _ => None,
        })
        .expect("a Deployment")
}

fn pod(d: &Desired) -> &PodSpec {
    deployment(d).spec.template.spec.as_ref().unwrap()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's arguments, as one line.
fn args(c: &Container) -> String {
    c.args.as_ref().unwrap().join(" ")
}

fn kinds(d: &Desired) -> Vec<&'static str> {
    d.children.iter().map(Child::kind).collect()
}

#[test]
fn a_minimal_model_gets_a_pulling_hardened_deployment_and_a_service() {
    let d = children(&md(json!({"model": {"uri": "hf://org/m"}})));
    assert_eq!(
        kinds(&d),
        ["Deployment", "Service"],
        "no PDB for one replica"
    );
    let dep = deployment(&d);
    assert_eq!(dep.spec.replicas, Some(1));
    let owner = &dep.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("ModelDeployment", "0000-1111", Some(true))
    );
    let labels = dep.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kandle-operator");
    assert_eq!(labels["app.kubernetes.io/instance"], "smollm");
    let rolling = rolling_update(dep).unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::Int(0)),
        "no capacity lost in a rollout"
    );

    let pod = pod(&d);
    let pull = container(pod, "pull");
    let pull_args = args(pull);
    assert!(
        pull_args.starts_with(
            "pull --model hf://org/m --dest /models/model --report-file /dev/termination-log"
        ),
        "{pull_args}"
    );
    let server = container(pod, "server");
    let server_args = args(server);
    assert!(
        server_args.starts_with("serve --model /models/model --served-model-name smollm"),
        "{server_args}"
    );
    assert!(
        !server_args.contains("--device"),
        "CPU unless GPUs are asked for"
    );
    assert_eq!(server.image.as_deref(), Some("kandle-server:test"));
    assert_eq!(server.image.as_deref(), Some("kandle-server:test"));
    for c in [pull, server] {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
    }
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    assert_eq!(
        server
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        server
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert!(
        server
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .is_some()
    );
    assert!(
        pod.termination_grace_period_seconds.unwrap() > 30,
        "the grace period covers the preStop pause and the server's drain"
    );
    assert!(pod.tolerations.is_none() && pod.affinity.is_none());
}

#[test]
fn gpus_bring_limits_the_product_affinity_in_every_term_and_the_toleration() {
    let d = children(&md(json!({
        "model": {"uri": "hf://org/m"},
        "resources": {"gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}, "limits": {"memory": "40Gi"}},
        "scheduling": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}}},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}
    })));
    let pod = pod(&d);
    let server = container(pod, "server");
    let limits = server.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert!(args(server).contains("--device cuda"));
    assert_eq!(
        server.image.as_deref(),
        Some("kandle-server-cuda:test"),
        "a GPU pod runs the CUDA build: the CPU one refuses --device cuda"
    );
    let terms = &pod
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms.len(), 2, "the user's alternatives stay alternatives");
    for term in terms {
        let keys: Vec<_> = term
            .match_expressions
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        assert_eq!(keys, ["zone", "nvidia.com/gpu.product"]);
    }
    let tolerations: Vec<_> = pod
        .tolerations
        .as_ref()
        .unwrap()
        .iter()
        .map(|t| t.key.clone().unwrap())
        .collect();
    assert_eq!(tolerations, ["dedicated", "nvidia.com/gpu"]);
    let shm = volume(pod, "shm");
    assert_eq!(
        shm.empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "1Gi"
    );
    // 300 s plus 10 s per GiB of the 40 GiB limit, in 5 s probe periods.
    assert_eq!(
        server.startup_probe.as_ref().unwrap().failure_threshold,
        Some((300 + 400) / 5)
    );
}

/// The pod's volume `name`.
fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The Secrets mounted into `c`, by name.
fn mounted_secrets(pod: &PodSpec, c: &Container) -> Vec<String> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let volume = pod.volumes.iter().flatten().find(|v| v.name == m.name)?;
            volume.secret.as_ref()?.secret_name.clone()
        })
        .collect()
}

#[test]
fn secrets_reach_only_the_container_that_needs_them() {
    let d = children(&md(json!({
        "model": {"uri": "hf://org/gated", "credentialsSecret": "hf-token"},
        "server": {"apiKeySecret": "keys"}
    })));
    let pod = pod(&d);
    let pull = container(pod, "pull");
    let server = container(pod, "server");
    assert_eq!(mounted_secrets(pod, pull), ["hf-token"]);
    assert_eq!(
        mounted_secrets(pod, server),
        ["keys"],
        "the hub token never reaches the server"
    );
    assert!(
        pull.env_from.is_none() && server.env_from.is_none(),
        "secrets as files, never in the environment"
    );
    let credentials = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| {
            v.secret
                .as_ref()
                .filter(|s| s.secret_name.as_deref() == Some("hf-token"))
        })
        .unwrap();
    assert_eq!(
        (credentials.optional, credentials.default_mode),
        (Some(true), Some(0o440)),
        "a missing Secret lets the pull report it"
    );
    assert!(args(pull).contains(
        "--credentials-dir /var/run/secrets/kandle/credentials --credentials-secret hf-token"
    ));
    let text = serde_json::to_string(server).unwrap();
    assert!(!text.contains("hf-token"));
    assert!(args(server).contains("--api-key-file /var/run/kandle/api-key/api-key"));
    assert!(!serde_json::to_string(pull).unwrap().contains("api-key"));
}

#[test]
fn replicas_above_one_get_a_disruption_budget() {
    let d = children(&md(json!({"model": {"uri": "hf://org/m"}, "replicas": 3})));
    assert_eq!(kinds(&d), ["Deployment", "Service", "PodDisruptionBudget"]);
    assert_eq!(deployment(&d).spec.replicas, Some(3));
    let d = children(&md(
        json!({"model": {"uri": "hf://org/m"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}),
    ));
    assert_eq!(
        deployment(&d).spec.replicas,
        Some(2),
        "autoscaling starts at minReplicas"
    );
}

#[test]
fn a_pvc_cache_is_filled_by_a_job_before_the_pods_mount_it_read_only() {
    let md = md(
        json!({"model": {"uri": "hf://org/m", "credentialsSecret": "tok"}, "replicas": 2,
                       "cache": {"volume": "pvc", "pvc": {"size": "50Gi", "storageClassName": "fast"}}}),
    );
    let pulling = desired(&md, &settings(), 2).hold_deployment();
    assert_eq!(
        kinds(&pulling),
        [
            "PersistentVolumeClaim",
            "Job",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    assert!(
        pulling.hold_deployment,
        "the serving pods wait for the pull"
    );
    let ready = children(&md);
    assert_eq!(
        kinds(&ready),
        [
            "PersistentVolumeClaim",
            "Job",
            "Deployment",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    let Child::Job(job) = &ready.children[1] else {
        panic!()
    };
    let ModelSource::PvcCache { folder, .. } = ModelSource::of(&md, &settings()) else {
        panic!("a pvc cache")
    };
    assert!(
        job.metadata
            .name
            .as_ref()
            .unwrap()
            .starts_with("smollm-pull-")
    );
    let job_pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let pull = container(job_pod, "pull");
    assert!(args(pull).contains(&format!("--dest /models/{folder}")));
    assert_eq!(mounted_secrets(job_pod, pull), ["tok"]);
    let policy = job
        .spec
        .as_ref()
        .unwrap()
        .pod_failure_policy
        .as_ref()
        .unwrap();
    let rules: Vec<_> = policy
        .rules
        .iter()
        .map(|r| {
            (
                r.action.as_str(),
                r.on_exit_codes.as_ref().unwrap().values.clone(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [("FailJob", vec![3]), ("Ignore", vec![5])],
        "a permanent pull failure fails the Job; a missing Secret is waited for"
    );
    let pod = pod(&ready);
    assert!(pod.init_containers.is_none());
    let model = volume(pod, "model");
    let claim = model.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("smollm-cache", Some(true))
    );
    assert!(args(container(pod, "server")).contains(&format!("--model /models/{folder}")));

    // A new image is a new Job (a Job's template is immutable) into the same folder.
    let mut reimaged = md.clone();
    reimaged.spec.server =
        Some(serde_json::from_value(json!({"image": "kandle-server:v2"})).unwrap());
    assert_eq!(
        ModelSource::of(&reimaged, &settings()),
        ModelSource::of(&md, &settings())
    );
    let Child::Job(reimaged_job) = &children(&reimaged).children[1] else {
        panic!()
    };
    assert_ne!(reimaged_job.metadata.name, job.metadata.name);
    assert_eq!(children(&reimaged).pull_job, reimaged_job.metadata.name);

    // Another model is another folder and Job; the old pods keep serving meanwhile.
    let mut other = md.clone();
    other.spec.model.uri = "hf://org/other".into();
    let Child::Job(other_job) = &children(&other).children[1] else {
        panic!()
    };
    assert_ne!(other_job.metadata.name, job.metadata.name);
}

#[test]
fn a_node_cache_is_one_host_folder_per_model_pulled_by_the_pods_and_served_read_only() {
    let spec = |ns: &str, model: Value| {
        let mut md = md(json!({"model": model, "replicas": 2, "cache": {"volume": "node"}}));
        md.metadata.namespace = Some(ns.into());
        md
    };
    let public = spec("ml", json!({"uri": "hf://org/m"}));
    let d = children(&public);
    assert_eq!(
        kinds(&d),
        ["Deployment", "Service", "PodDisruptionBudget"],
        "no claim and no Job: each pod pulls, the node keeps it"
    );
    let ModelSource::NodeCache { root, folder } = ModelSource::of(&public, &settings()) else {
        panic!("a node cache")
    };
    assert_eq!(root, "/var/lib/kandle/models");
    assert_eq!(folder.len(), 32);
    let pod = pod(&d);
    let model = volume(pod, "model");
    let host = model.host_path.as_ref().unwrap();
    assert_eq!(
        (host.path.as_str(), host.type_.as_deref()),
        ("/var/lib/kandle/models", Some("DirectoryOrCreate"))
    );
    let pull = container(pod, "pull");
    assert!(args(pull).contains(&format!("--dest /models/{folder}")));
    let server = container(pod, "server");
    assert!(args(server).contains(&format!("--model /models/{folder}")));
    // The server sees its own model only, and cannot write it.
    let mount = server
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "model")
        .unwrap();
    assert_eq!(
        (
            mount.mount_path.as_str(),
            mount.sub_path.as_deref(),
            mount.read_only
        ),
        (
            format!("/models/{folder}").as_str(),
            Some(folder.as_str()),
            Some(true)
        )
    );

    // A public model is one folder on the node whichever namespace asks for it.
    let folder_of = |md: &ModelDeployment| crate::build::node_folder(md).unwrap();
    assert_eq!(
        folder_of(&spec("other", json!({"uri": "hf://org/m"}))),
        folder
    );
    // Another revision or choice of files is another folder.
    for other in [
        json!({"uri": "hf://org/m", "revision": "v2"}),
        json!({"uri": "hf://org/m", "include": ["*.safetensors"]}),
    ] {
        assert_ne!(folder_of(&spec("ml", other)), folder);
    }
    // A private model is shared only with those holding the same Secret in that namespace.
    let private = |ns: &str, secret: &str| {
        folder_of(&spec(
            ns,
            json!({"uri": "hf://org/m", "credentialsSecret": secret}),
        ))
    };
    assert_ne!(private("ml", "tok"), folder);
    assert_eq!(private("ml", "tok"), private("ml", "tok"));
    assert_ne!(private("ml", "tok"), private("other", "tok"));
    assert_ne!(private("ml", "tok"), private("ml", "tok2"));
    assert_eq!(
        crate::build::node_folder(&md(json!({"model": {"uri": "hf://org/m"}}))),
        None,
        "only cache.volume: node uses the node cache"
    );
}

#[test]
fn a_model_on_the_users_claim_is_served_read_only_without_a_pull() {
    let d = children(&md(json!({"model": {"uri": "pvc://models/llama/3b"}})));
    let pod = pod(&d);
    assert!(pod.init_containers.is_none());
    let claim = pod.volumes.as_ref().unwrap()[0]
        .persistent_volume_claim
        .as_ref()
        .unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("models", Some(true))
    );
    assert!(args(container(pod, "server")).contains("--model /models/llama/3b"));
}

#[test]
fn oci_models_are_image_volumes_where_the_cluster_mounts_them_else_pulled() {
    // `more`: include globs (an array) or a cache.
    let spec = |oci: Value, more: Option<Value>| {
        let mut spec = json!({"model": {"uri": "oci://reg.example:5000/models/tiny:v1",
            "credentialsSecret": "login", "oci": oci}});
        match more {
            Some(globs @ Value::Array(_)) => spec["model"]["include"] = globs,
            Some(cache) => spec["cache"] = cache,
            None => {}
        }
        md(spec)
    };
    let mounting = Settings {
        image_volumes: true,
        ..settings()
    };
    let with = |settings: &Settings, md: &ModelDeployment| {
        desired(md, settings, crate::replicas::wanted(md, None))
    };

    // Mounted: no pull step, the artifact read-only at /models, the login as pull secret.
    for (settings, md) in [
        (&mounting, spec(json!({}), None)),
        (&settings(), spec(json!({"mode": "volume"}), None)),
    ] {
        let d = with(settings, &md);
        let pod = pod(&d);
        assert!(pod.init_containers.is_none());
        let volume = &pod.volumes.as_ref().unwrap()[0];
        let image = volume.image.as_ref().unwrap();
        assert_eq!(
            (volume.name.as_str(), image.reference.as_deref()),
            ("model", Some("reg.example:5000/models/tiny:v1"))
        );
        let server = container(pod, "server");
        assert!(
            args(server).contains("--model /models "),
            "{}",
            args(server)
        );
        let mount = &server.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.read_only),
            ("model", Some(true))
        );
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "login");
        // The Secret is the kubelet's alone: no container mounts it.
        assert!(mounted_secrets(pod, server).is_empty());
    }

    // Pulled: where the cluster does not mount them, the spec says so, or a cache or a
    // choice of files is asked for.
    for (settings, md) in [
        (&settings(), spec(json!({"plainHttp": true}), None)),
        (
            &mounting,
            spec(json!({"mode": "pull", "plainHttp": true}), None),
        ),
        (
            &mounting,
            spec(json!({"plainHttp": true}), Some(json!({"volume": "pvc"}))),
        ),
        (
            &mounting,
            spec(json!({"plainHttp": true}), Some(json!(["*.gguf"]))),
        ),
    ] {
        let d = with(settings, &md);
        let pull = match d.children.iter().find_map(|c| match c {
            Child::Job(job) => job.spec.as_ref()?.template.spec.clone(),
            _ => None,
        }) {
            Some(job_pod) => container(&job_pod, "pull").clone(),
            None => container(pod(&d), "pull").clone(),
        };
        let a = args(&pull);
        assert!(
            a.contains("--model oci://reg.example:5000/models/tiny:v1")
                && a.contains("--plain-http"),
            "{a}"
        );
        assert!(pod(&d).image_pull_secrets.is_none());
        assert!(pod(&d).volumes.as_ref().unwrap()[0].image.is_none());
    }

    assert!(crate::build::image_volumes_by_default("1", "35"));
    assert!(crate::build::image_volumes_by_default("1", "36+"));
    assert!(!crate::build::image_volumes_by_default("1", "34"));
    assert!(!crate::build::image_volumes_by_default("", ""));
}

#[test]
fn the_revision_follows_the_pod_template_only() {
    let base = md(json!({"model": {"uri": "hf://org/m"}}));
    let rev = |m: &ModelDeployment| children(m).revision;
    let mut scaled = base.clone();
    scaled.spec.replicas = Some(4);
    scaled.spec.service = Some(serde_json::from_value(json!({"port": 8000})).unwrap());
    assert_eq!(
        rev(&base),
        rev(&scaled),
        "scaling and the Service do not roll pods"
    );
    let mut reimaged = base.clone();
    reimaged.spec.server =
        Some(serde_json::from_value(json!({"image": "kandle-server:v2"})).unwrap());
    assert_ne!(rev(&base), rev(&reimaged));
    let labels = deployment(&children(&base))
        .spec
        .template
        .metadata
        .clone()
        .unwrap()
        .labels
        .unwrap();
    assert_eq!(labels[REVISION_LABEL], rev(&base));
}

#[test]
fn endpoints_name_the_service_and_a_non_default_port() {
    let m = md(json!({"model": {"uri": "hf://org/m"}}));
    assert_eq!(
        endpoint(&m, &settings()),
        "http://smollm.ml.svc.cluster.local/v1"
    );
    let m = md(json!({"model": {"uri": "hf://org/m"}, "service": {"port": 8000}}));
    assert_eq!(
        endpoint(&m, &settings()),
        "http://smollm.ml.svc.cluster.local:8000/v1"
    );
}

#[test]
fn pull_steps_are_bounded_and_the_model_volume_has_a_size_limit() {
    let d = children(&md(json!({"model": {"uri": "hf://org/m"}})));
    let pull = container(pod(&d), "pull");
    let resources = pull.resources.as_ref().expect("pull resources");
    let get = |m: &Option<std::collections::BTreeMap<String, Quantity>>, k: &str| {
        m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone())
    };
    assert_eq!(get(&resources.requests, "memory").as_deref(), Some("128Mi"));
    assert_eq!(get(&resources.requests, "cpu").as_deref(), Some("250m"));
    assert_eq!(get(&resources.limits, "memory").as_deref(), Some("1Gi"));
    let size = |d: &Desired, name: &str| {
        volume(pod(d), name)
            .empty_dir
            .as_ref()?
            .size_limit
            .clone()
            .map(|q| q.0)
    };
    assert_eq!(size(&d, "model").as_deref(), Some("20Gi"), "the default");
    assert_eq!(size(&d, "tmp").as_deref(), Some("1Gi"));
    let big = children(&md(
        json!({"model": {"uri": "hf://org/m"}, "cache": {"sizeLimit": "200Gi"}}),
    ));
    assert_eq!(size(&big, "model").as_deref(), Some("200Gi"));
    let job = children(&md(
        json!({"model": {"uri": "hf://org/m"}, "cache": {"volume": "pvc"}}),
    ));
    let job_pod = job
        .children
        .iter()
        .find_map(|c| match c {
            Child::Job(j) => j.spec.as_ref()?.template.spec.clone(),
            _ => None,
        })
        .expect("a pull Job");
    assert!(container(&job_pod, "pull").resources.is_some());
}

#[test]
fn a_network_policy_admits_the_serving_port_from_chosen_namespaces_only() {
    assert!(
        !kinds(&children(&md(json!({"model": {"uri": "hf://org/m"}})))).contains(&"NetworkPolicy"),
        "none unless asked for"
    );
    let d = children(&md(json!({"model": {"uri": "hf://org/m"},
        "networkPolicy": {"fromNamespaces": ["apps", "ml"]}})));
    let policy = d
        .children
        .iter()
        .find_map(|c| match c {
            Child::NetworkPolicy(p) => Some(p.as_ref()),
            _ => None,
        })
        .expect("a NetworkPolicy");
    let spec = serde_json::to_value(policy.spec.as_ref().unwrap()).unwrap();
    assert_eq!(
        spec,
        json!({
            "podSelector": {"matchLabels": {"app.kubernetes.io/instance": "smollm",
                "app.kubernetes.io/managed-by": "kandle-operator"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                    "operator": "In", "values": ["apps", "kandle-system", "ml"]}]}}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }],
        })
    );
}

#[test]
fn more_than_one_gpu_per_pod_is_refused_saying_why_and_a_named_image_wins() {
    let doc = json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "big", "namespace": "ml"},
        "spec": {"model": {"uri": "hf://org/m"}, "resources": {"gpu": {"count": 2}}}});
    let e = crate::validate::model_deployment(&doc)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spec.resources.gpu") && e.contains("one GPU") && e.contains("left idle"),
        "{e}"
    );
    let named = md(
        json!({"model": {"uri": "hf://org/m"}, "resources": {"gpu": {"count": 1}},
        "server": {"image": "registry.local/kandle-server-cuda:dev"}}),
    );
    let d = children(&named);
    let server = container(pod(&d), "server");
    assert_eq!(
        server.image.as_deref(),
        Some("registry.local/kandle-server-cuda:dev")
    );
}
