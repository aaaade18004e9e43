//! The Kubernetes manifests agree with the code: container args are flags the binary accepts, the
//! probes and Services point at the port the replica listens on, the client Job targets the
//! headless Service's DNS name, and pods get longer to stop than a replica takes to drain.
//! Reads `k8s/base/*.yaml` and `k8s/tls/*.yaml` directly (no kubectl needed; `.ci/run` also renders
//! and validates them).

use clap::Parser;
use serde_yaml::Value;
use std::time::Duration;

fn documents(file: &str) -> Vec<Value> {
    let path = format!("{}/k8s/{file}", env!("CARGO_MANIFEST_DIR"));
    let path = if std::path::Path::new(&path).exists() {
        path
    } else {
        format!("{}/k8s/base/{file}", env!("CARGO_MANIFEST_DIR"))
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

use serde::Deserialize;

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .map(|i| args[i + 1].as_str())
}

fn namespace() -> String {
    documents("base/kustomization.yaml")[0]["namespace"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn replica_tiers_agree_with_the_binary() {
    for file in ["users.yaml", "front.yaml"] {
        let docs = documents(file);
        let deployment = of_kind(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args = args(container);
        meshlb::cli::Cli::try_parse_from(std::iter::once("meshlb".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{file}: the binary rejects {args:?}: {e}"));

        let listen: std::net::SocketAddr = flag(&args, "--listen").unwrap().parse().unwrap();
        let port = container["ports"][0]["containerPort"].as_u64().unwrap();
        assert_eq!(u64::from(listen.port()), port, "{file}");
        assert_eq!(
            container["readinessProbe"]["grpc"]["port"].as_u64(),
            Some(port)
        );
        assert_eq!(
            container["livenessProbe"]["grpc"]["port"].as_u64(),
            Some(port)
        );

        let service = of_kind(&docs, "Service");
        assert_eq!(service["spec"]["clusterIP"], "None", "{file}: headless");
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"],
            container["ports"][0]["name"]
        );
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["template"]["metadata"]["labels"]
        );

        let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
        let drain = humantime::parse_duration(flag(&args, "--drain-grace").unwrap()).unwrap()
            + humantime::parse_duration(flag(&args, "--drain-timeout").unwrap()).unwrap();
        assert!(
            grace > drain,
            "{file}: grace {grace:?} must exceed the drain {drain:?}"
        );

        // The admin service is reachable only from inside the pod (kubectl exec / port-forward):
        // loopback, and no port or Service names it.
        let admin: std::net::SocketAddr = flag(&args, "--admin-listen").unwrap().parse().unwrap();
        assert!(admin.ip().is_loopback(), "{file}: admin on {admin}");
        let exposed = |ports: &Value| {
            ports.as_sequence().into_iter().flatten().any(|p| {
                [&p["containerPort"], &p["port"], &p["targetPort"]]
                    .iter()
                    .any(|v| v.as_u64() == Some(u64::from(admin.port())))
            })
        };
        assert!(!exposed(&container["ports"]), "{file}: admin port exposed");
        assert!(
            !exposed(&service["spec"]["ports"]),
            "{file}: admin port in the Service"
        );

        let env = container["env"].as_sequence().unwrap();
        let id = env.iter().find(|e| e["name"] == "MESHLB_ID").unwrap();
        assert_eq!(id["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    }
}

#[test]
fn the_client_and_the_front_discover_the_headless_service() {
    let users = documents("users.yaml");
    let service = of_kind(&users, "Service");
    let name = service["metadata"]["name"].as_str().unwrap();
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    let expected = format!("dns:///{name}.{}.svc.cluster.local:{port}", namespace());

    let job = documents("client-job.yaml");
    let container = &of_kind(&job, "Job")["spec"]["template"]["spec"]["containers"][0];
    let args = args(container);
    meshlb::cli::Cli::try_parse_from(std::iter::once("meshlb".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the binary rejects {args:?}: {e}"));
    assert_eq!(flag(&args, "--target"), Some(expected.as_str()));
    expected.parse::<meshlb::Target>().unwrap();

    let front = documents("front.yaml");
    let front_args = args_of_deployment(&front);
    assert_eq!(flag(&front_args, "--upstream"), Some(expected.as_str()));
}

fn args_of_deployment(docs: &[Value]) -> Vec<String> {
    args(&of_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
}

#[test]
fn traces_go_to_the_jaeger_service() {
    let jaeger = documents("jaeger.yaml");
    let service = of_kind(&jaeger, "Service");
    let otlp = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "otlp-grpc")
        .unwrap();
    let expected = format!(
        "http://{}:{}",
        service["metadata"]["name"].as_str().unwrap(),
        otlp["port"].as_u64().unwrap()
    );
    for file in ["users.yaml", "front.yaml", "client-job.yaml"] {
        let docs = documents(file);
        let workload = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" || d["kind"] == "Job")
            .unwrap();
        let env = workload["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .unwrap();
        let endpoint = env
            .iter()
            .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
            .unwrap();
        assert_eq!(
            endpoint["value"].as_str(),
            Some(expected.as_str()),
            "{file}"
        );
    }
}

#[test]
fn the_tls_overlay_passes_flags_the_binary_accepts() {
    for file in [
        "tls/users-tls.yaml",
        "tls/front-tls.yaml",
        "tls/client-tls.yaml",
    ] {
        let docs = documents(file);
        let workload = &docs[0];
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args = args(container);
        meshlb::cli::Cli::try_parse_from(std::iter::once("meshlb".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{file}: the binary rejects {args:?}: {e}"));
        let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
        for path in args.iter().filter(|a| a.starts_with('/')) {
            assert!(
                path.starts_with(mount),
                "{file}: {path} is not under the Secret's mount {mount}"
            );
        }
        if workload["kind"] == "Deployment" {
            let health: std::net::SocketAddr =
                flag(&args, "--health-listen").unwrap().parse().unwrap();
            let probe = container["readinessProbe"]["grpc"]["port"].as_u64();
            assert_eq!(
                probe,
                Some(u64::from(health.port())),
                "{file}: probes ask the plaintext health port"
            );
            assert_eq!(
                flag(&args, "--admin-allow"),
                Some(meshlb::tls::ADMIN_IDENTITY),
                "{file}: under mTLS only the admin certificate may reconfigure a replica"
            );
        }
    }
}

/// The pod template of the first workload in `file` (a Deployment or the client Job).
fn pod_template(file: &str) -> Value {
    let docs = documents(file);
    docs.iter()
        .find(|d| d["kind"] == "Deployment" || d["kind"] == "Job")
        .unwrap_or_else(|| panic!("{file}: no workload"))["spec"]["template"]
        .clone()
}

#[test]
fn every_meshlb_pod_exposes_metrics_where_its_annotations_and_the_pod_monitor_look() {
    let monitor = &documents("monitoring/podmonitor.yaml")[0];
    assert_eq!(monitor["kind"], "PodMonitor");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let port_name = endpoint["port"].as_str().unwrap();
    assert_eq!(endpoint["path"], "/metrics");
    let common = documents("base/kustomization.yaml")[0]["commonLabels"].clone();
    for file in ["users.yaml", "front.yaml", "client-job.yaml"] {
        let template = pod_template(file);
        let container = &template["spec"]["containers"][0];
        let args = args(container);
        let listen: std::net::SocketAddr = flag(&args, "--metrics-listen")
            .unwrap_or_else(|| panic!("{file}: no --metrics-listen"))
            .parse()
            .unwrap();
        assert!(
            listen.ip().is_unspecified(),
            "{file}: metrics must be reachable by a scraper"
        );
        // The container port the PodMonitor names, and the annotations' port, are that one.
        let ports = container["ports"].as_sequence().unwrap();
        let named = ports
            .iter()
            .find(|p| p["name"] == port_name)
            .unwrap_or_else(|| panic!("{file}: no port named {port_name}"));
        assert_eq!(named["containerPort"].as_u64(), Some(listen.port() as u64));
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations["prometheus.io/port"],
            listen.port().to_string().as_str()
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        // The PodMonitor's selector matches the pod (kustomize adds the common labels to it).
        for (k, v) in selector {
            let labelled =
                template["metadata"]["labels"].get(k) == Some(v) || common.get(k) == Some(v);
            assert!(
                labelled,
                "{file}: the PodMonitor's selector {k:?} misses it"
            );
        }
    }
    for file in [
        "tls/users-tls.yaml",
        "tls/front-tls.yaml",
        "tls/client-tls.yaml",
    ] {
        let docs = documents(file);
        let args = args(&docs[0]["spec"]["template"]["spec"]["containers"][0]);
        assert!(
            flag(&args, "--metrics-listen").is_some(),
            "{file}: the overlay replaces the args and must keep --metrics-listen"
        );
    }
}

#[test]
fn the_dashboard_queries_only_series_the_code_exports() {
    let path = format!("{}/k8s/grafana/meshlb.json", env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let exported: Vec<&str> = meshlb::balance::metrics::NAMES
        .iter()
        .chain(meshlb::replica::metrics::NAMES)
        .copied()
        .collect();
    let series = regex::Regex::new(r"\b(?:grpc_(?:server|client)|meshlb|process)_[a-z_]+").unwrap();
    // Labels the code puts on its series (fixed by the metrics modules' unit tests), and the ones
    // the PodMonitor's relabelling and Prometheus add.
    let labels = [
        "target",
        "endpoint",
        "state",
        "reason",
        "grpc_service",
        "grpc_method",
        "grpc_type",
        "grpc_code",
        "route",
        "code",
        "le",
        "pod",
        "tier",
        "instance",
        "job",
        "namespace",
    ];
    let grouped = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let selected = regex::Regex::new(r#"([a-z_]+)\s*(?:=~|!=|!~|=)\s*""#).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id taken"
        );
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert!(target["refId"].is_string(), "{title}: refId");
            let expr = target["expr"].as_str().unwrap();
            let used = grouped
                .captures_iter(expr)
                .flat_map(|c| {
                    c[1].split(',')
                        .map(|l| l.trim().to_owned())
                        .collect::<Vec<_>>()
                })
                .chain(selected.captures_iter(expr).map(|c| c[1].to_owned()));
            for label in used.filter(|l| !l.is_empty()) {
                assert!(
                    labels.contains(&label.as_str()),
                    "{title}: no series has a `{label}` label ({expr})"
                );
            }
            for m in series.find_iter(expr) {
                let name = m.as_str();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| exported.contains(b))
                    .unwrap_or(name);
                assert!(
                    exported.contains(&base),
                    "{title}: `{name}` is not a series meshlb exports ({expr})"
                );
                queried.insert(base.to_owned());
            }
        }
    }
    // What the dashboard is for: per-replica rate and latency, errors, states, ejections, retries.
    for needed in [
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "grpc_client_handled_total",
        "meshlb_endpoint_state",
        "meshlb_endpoint_ejections_total",
        "meshlb_balancer_retries_total",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard never shows {needed}"
        );
    }
}
