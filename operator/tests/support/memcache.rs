//! Talking to real cache nodes (pods at their pod IPs, or processes on loopback) as a
//! client would: memcached text commands on a new TCP connection each, and HTTP/1.1 GETs
//! of the admin endpoint.

use kache_cluster::names;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest one exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 GET of `ip:port` `path`: (status, body).
pub async fn http_get(ip: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = TcpStream::connect((ip, port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {ip}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad response {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path} on {ip}:{port} timed out"))?
}

/// The owners of `key` in the member list the node at `ip` follows.
pub async fn owners(ip: &str, key: &str) -> Result<Vec<String>, String> {
    let (status, body) =
        http_get(ip, names::ADMIN_PORT, &format!("/cluster/owners?key={key}")).await?;
    if status != 200 {
        return Err(format!("/cluster/owners: {status} {body}"));
    }
    let doc: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(doc["owners"]
        .as_array()
        .ok_or_else(|| format!("no owners in {body}"))?
        .iter()
        .filter_map(|o| o.as_str().map(String::from))
        .collect())
}

/// Sends one memcached request on a new connection to `ip:port` and reads the
/// reply up to and including a line that is one of `ends` (or an error line).
pub async fn exchange(ip: &str, port: u16, request: &str, ends: &[&str]) -> Result<String, String> {
    let exchange = async {
        let mut s = TcpStream::connect((ip, port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            let last_line = text
                .strip_suffix("\r\n")
                .map(|t| t.rsplit("\r\n").next().unwrap_or(t));
            if let Some(line) = last_line {
                if ends.contains(&line)
                    || line.starts_with("SERVER_ERROR")
                    || line.starts_with("CLIENT_ERROR")
                    || line == "ERROR"
                {
                    return Ok(text.to_string());
                }
            }
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{request:?} on {ip}:{port} timed out"))?
}

/// `config get cluster` on `ip:port`.
pub async fn config_get_cluster(ip: &str, port: u16) -> Result<String, String> {
    exchange(ip, port, "config get cluster\r\n", &["END"]).await
}

/// `set key 0 0 <len>` on `ip:port`.
pub async fn set(ip: &str, port: u16, key: &str, value: &str) -> Result<(), String> {
    let reply = exchange(
        ip,
        port,
        &format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()),
        &["STORED"],
    )
    .await?;
    if reply == "STORED\r\n" {
        Ok(())
    } else {
        Err(format!("set {key} on {ip}: {reply:?}"))
    }
}

/// `get key` on `ip:port`: the value, or `None` on a miss.
pub async fn get(ip: &str, port: u16, key: &str) -> Result<Option<String>, String> {
    let reply = exchange(ip, port, &format!("get {key}\r\n"), &["END"]).await?;
    if reply == "END\r\n" {
        return Ok(None);
    }
    let mut lines = reply.split("\r\n");
    match (lines.next(), lines.next(), lines.next()) {
        (Some(header), Some(value), Some("END")) if header.starts_with("VALUE ") => {
            Ok(Some(value.to_string()))
        }
        _ => Err(format!("get {key} on {ip}: {reply:?}")),
    }
}

/// Writes `per_node` keys owned by each of `nodes` (member name, pod IP) straight
/// to their owner, as a ketama client
/// would, and returns them: (key, value, owner). `ask` is a node that follows
/// the current member list (it answers who owns a key).
pub async fn write_owned_keys(
    ask: &str,
    nodes: &[(&str, &str)],
    per_node: usize,
    prefix: &str,
) -> Vec<(String, String, String)> {
    let mut written = Vec::new();
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for i in 0.. {
        if nodes
            .iter()
            .all(|(n, _)| count.get(*n).copied().unwrap_or(0) >= per_node)
        {
            break;
        }
        assert!(
            i < 100 * per_node * nodes.len(),
            "no keys owned by {nodes:?} found"
        );
        let key = format!("{prefix}-{i}");
        let owner = owners(ask, &key).await.unwrap();
        assert_eq!(
            owner.len(),
            1,
            "replicationFactor 1: one owner of {key}: {owner:?}"
        );
        let Some((name, ip)) = nodes.iter().find(|(n, _)| *n == owner[0]) else {
            continue;
        };
        let c = count.entry(name.to_string()).or_default();
        if *c >= per_node {
            continue;
        }
        *c += 1;
        let value = format!("value-of-{key}");
        set(ip, names::MEMCACHE_PORT, &key, &value).await.unwrap();
        written.push((key, value, name.to_string()));
    }
    written
}
