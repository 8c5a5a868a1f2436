//! `wsbroker demo`: a built-in upstream application plus one node on the
//! memory registry, so the broker can be tried with nothing else running.
//!
//! The demo application echoes every message back on any path, and on
//! paths starting with `/chat` relays each message to every chat client.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::server::{self, Node, StartError};

/// Chat messages waiting for slow readers before they are skipped.
const CHAT_BACKLOG: usize = 256;

/// Serves the demo application until `stop` fires.
pub async fn serve_app(listener: TcpListener, stop: CancellationToken) {
    let (chat, _) = broadcast::channel::<Message>(CHAT_BACKLOG);
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        tasks.spawn(app_connection(stream, chat.clone(), stop.clone()));
    }
    tasks.close();
    tasks.wait().await;
}

async fn app_connection(
    stream: TcpStream,
    chat: broadcast::Sender<Message>,
    stop: CancellationToken,
) {
    let mut path = String::new();
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    if !path.starts_with("/chat") {
        while let Some(Ok(msg)) =
            tokio::select! { m = rx.next() => m, _ = stop.cancelled() => None }
        {
            if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                return;
            }
        }
        return;
    }
    let mut room = chat.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            m = rx.next() => match m {
                Some(Ok(msg)) if msg.is_text() || msg.is_binary() => { let _ = chat.send(msg); }
                Some(Ok(_)) => {}
                _ => return,
            },
            m = room.recv() => match m {
                Ok(msg) => if tx.send(msg).await.is_err() { return },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
        }
    }
}

/// The demo node's configuration for an application at `app`.
pub fn demo_config(listen: SocketAddr, admin: SocketAddr, app: SocketAddr) -> Config {
    let text = format!(
        "[node]\nid = \"demo\"\nlisten = \"{listen}\"\ndrain_timeout = \"2s\"\n\
         [upstream]\nservers = [\"ws://{app}\"]\n\
         [admin]\nlisten = \"{admin}\"\n"
    );
    // The text above is built from valid addresses: parsing cannot fail.
    #[allow(clippy::expect_used)]
    Config::parse(&text, &|_| None).expect("demo configuration is valid")
}

/// Starts the demo application and a node in front of it.
pub async fn start(listen: SocketAddr, stop: CancellationToken) -> Result<Node, StartError> {
    let app_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let app = TcpListener::bind(app_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: app_addr,
            source,
        })?;
    let app_addr = app.local_addr().map_err(|source| StartError::Bind {
        addr: app_addr,
        source,
    })?;
    tokio::spawn(serve_app(app, stop));
    let admin = SocketAddr::new(listen.ip(), 9090);
    match server::start(demo_config(listen, admin, app_addr)).await {
        // 9090 taken: any free port will do, the banner names it.
        Err(StartError::Bind { addr, .. }) if addr == admin => {
            server::start(demo_config(
                listen,
                SocketAddr::new(listen.ip(), 0),
                app_addr,
            ))
            .await
        }
        other => other,
    }
}

/// What `wsbroker demo` prints once it is up.
pub fn banner(node: &Node) -> String {
    let p = node.public_addr;
    let admin = node.admin_addr.map(|a| a.to_string()).unwrap_or_default();
    format!(
        "wsbroker demo is running.\n\n\
         Try it (any WebSocket client, e.g. websocat):\n  \
         ws://{p}/echo?session=hello      echoes every message\n  \
         ws://{p}/chat?session=alice      relays to every /chat client\n\n\
         Health:       http://{p}/health\n\
         Status page:  http://{admin}/admin/\n\
         Metrics:      http://{admin}/metrics\n\n\
         Press Ctrl-C to stop.\n"
    )
}
