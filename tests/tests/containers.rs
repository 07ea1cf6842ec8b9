//! The deploy folder on real containers: the runtime image built here
//! without pulling anything, the Compose swarm (a bootstrap node and three
//! scaled peers, each with its own volume and share of the data) trained to
//! the accuracy bar, one container stopped mid-round and started again, one
//! cut off the network and put back, and everything the test made removed
//! at the end, also when it fails. Plus the monitoring configuration:
//! Prometheus's checked by `promtool`, Grafana's dashboard against the
//! metrics a real node exports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn digits() -> PathBuf {
    tapestry_testkit::digits_path()
}

/// Runs a command; its stdout, or a panic with its stderr.
fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether Docker and Compose are here. In CI they must be: there a
/// missing engine is a failure, not a skip.
fn docker_or_skip(test: &str) -> bool {
    let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    if ok(Command::new("docker").arg("info")) && ok(Command::new("docker-compose").arg("version")) {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{test}: CI must run the container tests (docker and docker-compose)"
    );
    eprintln!("{test}: skipped here: no docker engine or docker-compose");
    false
}

/// A Compose project of this test: torn down (containers, networks,
/// volumes, the image) when dropped, whether the test passed or not.
struct Swarm {
    /// The Compose file, under deploy/.
    file: &'static str,
    /// Its network's name.
    net: &'static str,
    project: String,
    image: String,
    env: Vec<(String, String)>,
}

impl Swarm {
    fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &self.project, "-f"])
            .arg(root().join("deploy").join(self.file));
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Container ids of a service.
    fn ids(&self, service: &str) -> Vec<String> {
        sh(self.compose().args(["ps", "-q", service]))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn network(&self) -> String {
        format!("{}_{}", self.project, self.net)
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// The address of a container on the swarm's network.
fn ip_of(id: &str, network: &str) -> Option<String> {
    let out = Command::new("docker")
        .args([
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            id,
        ])
        .output()
        .ok()?;
    let ip = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!ip.is_empty() && ip != "<no value>").then_some(ip)
}

/// GET http://IP:8080PATH, if it answers (the node's own HTTP client).
fn get(ip: &str, path: &str) -> Option<String> {
    tapestry_node::api::get(&format!("{ip}:8080"), path, Duration::from_secs(5)).ok()
}

fn status(ip: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&get(ip, "/status")?).ok()
}

/// Waits (at most `secs`) until `ok` holds for the statuses of all `ids`.
fn wait_all(
    swarm: &Swarm,
    ids: &[String],
    secs: u64,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = ids
            .iter()
            .map(|id| {
                ip_of(id, &swarm.network())
                    .and_then(|ip| status(&ip))
                    .unwrap_or(serde_json::Value::Null)
            })
            .collect();
        if last.iter().all(|s| !s.is_null() && ok(s)) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // First a line per node (what a truncated CI log still shows), then
    // the statuses and each lagging node's last log lines.
    let summary = ids
        .iter()
        .zip(&last)
        .map(|(id, s)| {
            let name = container_name(id);
            if s.is_null() {
                return format!("{name}: no status");
            }
            let head = s["head"].as_str().unwrap_or("-");
            format!(
                "{name}: {} round {} finished {} peers {} head {}",
                if ok(s) { "ok" } else { "NOT" },
                round(s),
                s["finished"],
                s["peers"],
                &head[..head.len().min(8)]
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let logs = ids
        .iter()
        .zip(&last)
        .filter(|(_, s)| s.is_null() || !ok(s))
        .map(|(id, _)| {
            let out = Command::new("docker")
                .args(["logs", "--tail", "40", id])
                .output();
            let log = out
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            format!("--- {}\n{log}", container_name(id))
        })
        .collect::<Vec<_>>()
        .join("\n");
    panic!("timed out waiting for {what}: {summary}\n{last:?}\n{logs}");
}

/// A container's name (its id if docker cannot tell).
fn container_name(id: &str) -> String {
    Command::new("docker")
        .args(["inspect", "-f", "{{.Name}}", id])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches('/')
                .to_owned()
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| id.chars().take(12).collect())
}

fn round(s: &serde_json::Value) -> u64 {
    s["round"].as_u64().unwrap_or(0)
}

#[test]
fn a_compose_swarm_trains_survives_a_stop_and_a_cut_and_is_torn_down() {
    if !docker_or_skip("compose swarm") {
        return;
    }
    let pid = std::process::id();
    let rounds = 90;
    let swarm = Swarm {
        file: "compose.yaml",
        net: "swarm",
        project: format!("tapestrytest{pid}"),
        image: format!("tapestry-test:{pid}"),
        env: vec![
            ("TAPESTRY_IMAGE".into(), format!("tapestry-test:{pid}")),
            ("TAPESTRY_DATA_FILE".into(), digits().display().to_string()),
            ("TAPESTRY_ROUNDS".into(), rounds.to_string()),
            ("TAPESTRY_SHARDS".into(), "4".into()),
            ("TAPESTRY_START_PEERS".into(), "3".into()),
            ("TAPESTRY_MIN_ROUND_MS".into(), "400".into()),
        ],
    };
    // The runtime image, from the binary `cargo test --workspace` built,
    // FROM scratch: nothing is pulled.
    let built = sh(Command::new(root().join("deploy/build-image.sh"))
        .arg(&swarm.image)
        .arg("--debug"));
    eprintln!("{}", built.trim());
    sh(swarm.compose().args(["up", "-d", "--scale", "peer=3"]));
    let mut ids = swarm.ids("bootstrap");
    ids.extend(swarm.ids("peer"));
    assert_eq!(ids.len(), 4, "{ids:?}");
    let started = Instant::now();

    // They find each other (by the bootstrap's DNS name) and train.
    wait_all(
        &swarm,
        &ids,
        120,
        "every node at round 8 with 3 peers",
        |s| round(s) >= 8 && s["peers"].as_u64().unwrap_or(0) >= 3,
    );
    eprintln!("round 8 after {:.1} s", started.elapsed().as_secs_f64());

    // Docker's health check (`tapestry health` inside the image) passes.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let states: Vec<String> = ids
            .iter()
            .map(|id| {
                sh(Command::new("docker").args([
                    "inspect",
                    "--format",
                    "{{.State.Health.Status}}",
                    id,
                ]))
                .trim()
                .to_owned()
            })
            .collect();
        if states.iter().all(|s| s == "healthy") {
            break;
        }
        assert!(Instant::now() < deadline, "health checks: {states:?}");
        std::thread::sleep(Duration::from_secs(2));
    }

    // Stop one peer mid-round (SIGTERM), start it again: it resumes from
    // its volume and catches up.
    let stopped = &ids[1];
    sh(Command::new("docker").args(["stop", "-t", "10", stopped]));
    std::thread::sleep(Duration::from_secs(4));
    sh(Command::new("docker").args(["start", stopped]));
    let others = |s: &[serde_json::Value]| s.iter().map(round).max().unwrap_or(0);
    let now = wait_all(&swarm, &ids, 10, "statuses", |_| true);
    let target = others(&now);
    wait_all(&swarm, &ids, 60, "the restarted node to catch up", |s| {
        round(s) >= target
    });
    eprintln!(
        "restart caught up after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Cut another one off the network for a while, then put it back: it
    // rejoins (dials the bootstrap again) and agrees again.
    let cut = &ids[2];
    let net = swarm.network();
    sh(Command::new("docker").args(["network", "disconnect", &net, cut]));
    // The others notice (failed pings close the connections) and go on.
    let rest: Vec<String> = ids.iter().filter(|i| *i != cut).cloned().collect();
    let noticed = wait_all(&swarm, &rest, 60, "the others to lose the cut node", |s| {
        s["peers"].as_u64().unwrap_or(9) <= 2
    });
    eprintln!(
        "cut noticed after {:.1} s, at rounds {:?}",
        started.elapsed().as_secs_f64(),
        noticed.iter().map(round).collect::<Vec<_>>()
    );
    sh(Command::new("docker").args(["network", "connect", &net, cut]));
    wait_all(&swarm, &ids, 60, "the cut node back with 3 peers", |s| {
        s["peers"].as_u64().unwrap_or(0) >= 3
    });
    eprintln!("reconnected after {:.1} s", started.elapsed().as_secs_f64());

    // Every node finishes its rounds on one head, above the accuracy bar.
    let done = wait_all(&swarm, &ids, 180, "all to finish", |s| {
        s["finished"].as_bool().unwrap_or(false)
    });
    let mut heads: BTreeSet<String> = done.iter().map(|s| s["head_params"].to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while heads.len() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        heads = wait_all(&swarm, &ids, 10, "statuses", |_| true)
            .iter()
            .map(|s| s["head_params"].to_string())
            .collect();
    }
    assert_eq!(heads.len(), 1, "heads differ: {heads:?}");
    for s in &done {
        assert_eq!(round(s), rounds, "{s}");
        assert!(s["accuracy"].as_f64().unwrap() >= 0.9, "{s}");
    }
    eprintln!(
        "all finished on one head after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The dashboard asks only for metrics a node exports.
    let ip = ip_of(&ids[0], &net).unwrap();
    let metrics = get(&ip, "/metrics").unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/tapestry.json")).unwrap(),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tapestry_") {
                    names.insert(word.to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        // A series, or at least the metric's declaration (a family with no
        // series yet, such as rejections when nothing was rejected).
        let base = name.trim_end_matches("_total");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name.as_str()) || l.starts_with(&format!("# TYPE {base} "))),
            "the dashboard uses {name}, which /metrics does not have"
        );
    }
    drop(swarm);
    // Nothing of the project is left.
    let left = sh(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project=tapestrytest{pid}"),
        "-q",
    ]));
    assert!(left.trim().is_empty(), "containers left: {left}");
    let volumes = sh(Command::new("docker").args([
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project=tapestrytest{pid}"),
    ]));
    assert!(volumes.trim().is_empty(), "volumes left: {volumes}");
}

#[test]
fn two_federated_regions_in_compose_end_on_one_model_that_knows_every_class() {
    if !docker_or_skip("federated regions") {
        return;
    }
    let pid = std::process::id();
    let data = tempfile::tempdir().unwrap();
    let (east, west) = (data.path().join("east.csv"), data.path().join("west.csv"));
    tapestry_testkit::write_digits_of(0..5, &east);
    tapestry_testkit::write_digits_of(5..10, &west);
    let rounds = 12;
    let swarm = Swarm {
        file: "compose.federation.yaml",
        net: "federation",
        project: format!("tapestryfed{pid}"),
        image: format!("tapestry-fed:{pid}"),
        env: vec![
            ("TAPESTRY_IMAGE".into(), format!("tapestry-fed:{pid}")),
            ("TAPESTRY_EAST_DATA".into(), east.display().to_string()),
            ("TAPESTRY_WEST_DATA".into(), west.display().to_string()),
            ("TAPESTRY_ROUNDS".into(), rounds.to_string()),
            ("TAPESTRY_MIN_ROUND_MS".into(), "300".into()),
        ],
    };
    sh(Command::new(root().join("deploy/build-image.sh"))
        .arg(&swarm.image)
        .arg("--debug"));
    sh(swarm.compose().args(["up", "-d"]));
    let regions = ["east", "west"];
    let ids: Vec<Vec<String>> = regions
        .iter()
        .map(|r| (0..3).flat_map(|i| swarm.ids(&format!("{r}{i}"))).collect())
        .collect();
    let all: Vec<String> = ids.concat();
    assert_eq!(all.len(), 6, "{all:?}");
    let started = Instant::now();
    let done = wait_all(&swarm, &all, 240, "all to finish", |s| {
        s["finished"].as_bool().unwrap_or(false)
    });
    eprintln!("finished after {:.1} s", started.elapsed().as_secs_f64());
    for (k, region) in regions.iter().enumerate() {
        let statuses = &done[3 * k..3 * k + 3];
        let taken: u64 = statuses
            .iter()
            .map(|s| s["federation"]["foreign_heads_taken"].as_u64().unwrap())
            .sum();
        let signed: u64 = statuses
            .iter()
            .map(|s| s["federation"]["mixes_signed"].as_u64().unwrap())
            .sum();
        eprintln!("{region}: {taken} foreign heads taken, {signed} mixes signed");
        assert!(taken >= 3 && signed >= 1, "{statuses:?}");
        for s in statuses {
            assert_eq!(s["region"], *region);
            assert_eq!(round(s), rounds, "{s}");
        }
        // One head within the region.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let heads: BTreeSet<String> = wait_all(&swarm, &ids[k], 10, "statuses", |_| true)
                .iter()
                .map(|s| s["head_params"].to_string())
                .collect();
            if heads.len() == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "{region} disagrees: {heads:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Each region's model, copied out of its first node once stopped and
    // exported by the host's binary, knows all ten classes (a region alone
    // half of them: 0.49 to 0.50 in the process test).
    let spec = tapestry_core::model::ModelSpec::Logistic {
        inputs: 64,
        classes: 10,
    };
    let mut pooled = tapestry_core::data::load_csv(&digits(), Default::default()).unwrap();
    tapestry_core::data::Scaler::from_range(64, 0.0, 16.0).apply(&mut pooled);
    let pooled = tapestry_core::model::Examples::Rows(pooled);
    let tapestry = root().join("target/debug/tapestry");
    for (k, region) in regions.iter().enumerate() {
        let first = &ids[k][0];
        sh(Command::new("docker").args(["stop", "-t", "20", first]));
        let copy = data.path().join(region);
        sh(Command::new("docker")
            .arg("cp")
            .arg(format!("{first}:/data/{region}/node0"))
            .arg(&copy));
        let file = data.path().join(format!("{region}.safetensors"));
        sh(Command::new(&tapestry)
            .args(["model", "export", "--data-dir"])
            .arg(&copy)
            .arg("--out")
            .arg(&file));
        let params = tapestry_core::model::import_safetensors(&spec, &file).unwrap();
        let accuracy = tapestry_core::model::evaluate_on(&spec, &params, &pooled)
            .unwrap()
            .accuracy
            .unwrap();
        eprintln!("{region}: accuracy on all ten classes {accuracy:.3}");
        assert!(accuracy > 0.7, "{region}: {accuracy}");
    }
}

/// The YAML documents of a file, as JSON (parsed by PyYAML, which
/// docker-compose brings along).
fn yaml_docs(path: &std::path::Path) -> Vec<serde_json::Value> {
    // Debian's python3, which docker-compose (and so PyYAML) runs on.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| !p.starts_with('/') || std::path::Path::new(p).exists())
        .unwrap();
    let out = sh(Command::new(python).args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
    ])
    .arg(path));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_deploy_configs_pass_their_own_tools() {
    if !docker_or_skip("config checks") {
        return;
    }
    let out = Command::new("docker-compose")
        .args(["-f"])
        .arg(root().join("deploy/compose.yaml"))
        .args(["--profile", "monitoring", "config", "--services"])
        .env("TAPESTRY_DATA_FILE", digits())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for s in ["bootstrap", "peer", "prometheus", "grafana"] {
        assert!(services.contains(s), "{services:?}");
    }
    // Without the data file Compose refuses, naming the variable.
    let out = Command::new("docker-compose")
        .args(["-f"])
        .arg(root().join("deploy/compose.yaml"))
        .arg("config")
        .env_remove("TAPESTRY_DATA_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TAPESTRY_DATA_FILE"));
    // The federation's file: its services, and each region's data named.
    let fed = |east: bool| {
        let mut c = Command::new("docker-compose");
        c.args(["-f"])
            .arg(root().join("deploy/compose.federation.yaml"))
            .args(["config", "--services"])
            .env("TAPESTRY_WEST_DATA", digits());
        if east {
            c.env("TAPESTRY_EAST_DATA", digits());
        } else {
            c.env_remove("TAPESTRY_EAST_DATA");
        }
        c.output().unwrap()
    };
    let out = fed(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for s in ["setup", "east0", "east2", "west0", "west2"] {
        assert!(services.contains(s), "{services:?}");
    }
    let out = fed(false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TAPESTRY_EAST_DATA"));
    let promtool = Command::new("promtool")
        .args(["check", "config"])
        .arg(root().join("deploy/prometheus/prometheus.yml"))
        .output();
    match promtool {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "CI installs promtool (Debian's prometheus): {e}"
            );
            eprintln!("promtool not here ({e}); its check is skipped");
        }
    }
    // The systemd unit: systemd's own checker, and its exposure score
    // (0 = locked down, 10 = exposed; 30 is 3.0 on its 0-100 scale) at most
    // 3. It wants the binary to
    // exist, so a copy names the one built here.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("tapestry.service");
        let tapestry = root().join("target/debug/tapestry").canonicalize().unwrap();
        std::fs::write(
            &unit,
            std::fs::read_to_string(root().join("deploy/systemd/tapestry.service"))
                .unwrap()
                .replace("/usr/local/bin/tapestry", &tapestry.display().to_string()),
        )
        .unwrap();
        sh(Command::new("systemd-analyze").arg("verify").arg(&unit));
        let security = sh(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=30"])
            .arg(&unit));
        eprintln!("{}", security.lines().last().unwrap_or(""));
    } else {
        eprintln!("systemd-analyze not here; the unit's check is skipped");
    }
    // Kubernetes: the objects the deploy issue asks for, wired together.
    let docs = yaml_docs(&root().join("deploy/k8s/tapestry.yaml"));
    let kind = |k: &str| {
        docs.iter()
            .filter(|d| d["kind"] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    let sts = &kind("StatefulSet")[0];
    let services = kind("Service");
    let headless = services
        .iter()
        .find(|s| s["spec"]["clusterIP"] == "None")
        .expect("a headless Service");
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert!(
        services
            .iter()
            .any(|s| s["metadata"]["name"] == "tapestry-bootstrap")
    );
    assert_eq!(kind("ConfigMap").len(), 1);
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/status");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    assert!(pod["securityContext"]["runAsNonRoot"].as_bool().unwrap());
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        container["volumeMounts"][0]["name"]
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The bootstrap address names the bootstrap Service.
    assert!(
        args.iter().any(|a| a.contains("tapestry-bootstrap")),
        "{args:?}"
    );
    // Grafana's provisioning files parse and point at the dashboard folder.
    let ds = &yaml_docs(&root().join("deploy/grafana/provisioning/datasources/prometheus.yaml"))[0];
    assert_eq!(ds["datasources"][0]["uid"], "prometheus");
    let dp = &yaml_docs(&root().join("deploy/grafana/provisioning/dashboards/tapestry.yaml"))[0];
    assert_eq!(
        dp["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}
