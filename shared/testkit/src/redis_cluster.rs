//! A throwaway Redis Cluster: three masters on loopback, the slots split among them by
//! `redis-cli --cluster create`, for the tests that check the mesh on a cluster (DESIGN names
//! Redis Cluster; keys that one command touches together must share a slot there).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::process::{Child, Command};

/// Three `redis-server --cluster-enabled yes` processes forming one cluster, killed (and their
/// directory removed) with this value.
#[derive(Debug)]
pub struct LocalRedisCluster {
    ports: Vec<u16>,
    _nodes: Vec<Child>,
    dir: tempfile::TempDir,
}

impl LocalRedisCluster {
    /// Starts the nodes, joins them and waits until every node says the cluster is up.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stowage-redis-cluster-")
            .tempdir()?;
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let port = stowage_local::free_port()?;
            // The bus port is named (Redis 7's `--cluster-port`): port + 10000, Redis's
            // default, may not exist.
            let bus = stowage_local::free_port()?;
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir(&node_dir)?;
            let child = stowage_local::redis_command(port)
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-node-timeout", "5000"])
                .arg("--dir")
                .arg(&node_dir)
                // What says why a node stopped, shown when it does not come up.
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("redis-server (scripts/setup installs it)")?;
            nodes.push(child);
            ports.push(port);
        }
        let cluster = Self {
            ports,
            _nodes: nodes,
            dir,
        };
        for port in &cluster.ports {
            cluster.wait_for(*port, "PING", "PONG").await?;
        }
        let create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .kill_on_drop(true)
            .output();
        let create = tokio::time::timeout(Duration::from_secs(30), create)
            .await
            .with_context(|| format!("redis-cli --cluster create hung{}", cluster.logs()))?
            .context("redis-cli")?;
        ensure!(
            create.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&create.stdout),
            cluster.logs()
        );
        for port in &cluster.ports {
            cluster
                .wait_for(*port, "CLUSTER INFO", "cluster_state:ok")
                .await?;
        }
        Ok(cluster)
    }

    /// Waits up to 10 s until `command` sent to the node on `port` answers with `expected` in
    /// its reply.
    async fn wait_for(&self, port: u16, command: &str, expected: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(command.split_whitespace())
                .kill_on_drop(true)
                .output();
            let answered = tokio::time::timeout(Duration::from_secs(2), reply)
                .await
                .ok()
                .transpose()
                .context("redis-cli")?
                .is_some_and(|r| String::from_utf8_lossy(&r.stdout).contains(expected));
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "redis node {port}: {command} never answered {expected}{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The nodes' logs, to say why one did not come up.
    fn logs(&self) -> String {
        (0..self.ports.len())
            .map(|i| {
                let log = self.dir.path().join(format!("node{i}/redis.log"));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                format!("\n--- node{i} ---\n{}", text.trim_end())
            })
            .collect()
    }

    /// The URL that names every node (`redis-cluster://first?node=second&node=third`).
    pub fn url(&self) -> String {
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.ports[0],
            others.join("&")
        )
    }

    /// The port of each node.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}
