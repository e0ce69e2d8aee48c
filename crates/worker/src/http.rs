//! `/metrics` and `/healthz` over plain HTTP/1.1: one request per connection, GET only. Small
//! on purpose — a scrape endpoint needs nothing more, and it keeps a web framework out of a
//! daemon that holds a repository key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server answers with.
pub trait Endpoints: Send + Sync + 'static {
    /// The metrics text.
    fn metrics(&self) -> String;
    /// `Ok(text)` when healthy, `Err(text)` when not (503).
    fn health(&self) -> Result<String, String>;
}

/// Binds `addr` (fails at once when it cannot) and serves until the task is dropped.
pub async fn serve(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    // A few connections at a time: a scanner or a slow client must not take the file
    // descriptors the backups need.
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let task = tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _ = tokio::time::timeout(Duration::from_secs(10), handle(&mut sock, endpoints.as_ref())).await;
            });
        }
    });
    Ok((bound, task))
}

async fn handle(sock: &mut tokio::net::TcpStream, endpoints: &dyn Endpoints) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read up to the end of the headers (requests have no body here).
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 << 10 {
            return respond(
                sock,
                "431 Request Header Fields Too Large",
                "text/plain",
                "headers too large\n",
                false,
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(sock, "405 Method Not Allowed", "text/plain", "only GET\n", false).await;
    }
    match path {
        "/metrics" => {
            let body = endpoints.metrics();
            respond(sock, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body, head_only).await
        }
        "/healthz" => match endpoints.health() {
            Ok(t) => respond(sock, "200 OK", "text/plain", &t, head_only).await,
            Err(t) => respond(sock, "503 Service Unavailable", "text/plain", &t, head_only).await,
        },
        "/" => {
            respond(
                sock,
                "200 OK",
                "text/plain",
                "ferry worker: /metrics (Prometheus), /healthz\n",
                head_only,
            )
            .await
        }
        _ => respond(sock, "404 Not Found", "text/plain", "not found\n", head_only).await,
    }
}

async fn respond(sock: &mut tokio::net::TcpStream, status: &str, ctype: &str, body: &str, head_only: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    if !head_only {
        sock.write_all(body.as_bytes()).await?;
    }
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);
    impl Endpoints for Fixed {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        fn health(&self) -> Result<String, String> {
            if self.0 {
                Ok("ok\n".into())
            } else {
                Err("stalled\n".into())
            }
        }
    }

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Fixed(true))).await.unwrap();
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.ends_with("\r\n\r\nm 1\n"), "{r}");
        assert!(get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await.ends_with("ok\n"));
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        task.abort();
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Fixed(false))).await.unwrap();
        assert!(get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 503"));
        task.abort();
    }
}
