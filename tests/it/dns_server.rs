//! A real DNS server on a loopback UDP socket whose answers the test changes: A records with a
//! 1 s TTL, an empty answer, SERVFAIL, or silence (a server that is down); and the TXT record
//! `_grpc_config.HOST` (gRPC's service config in DNS) when the test sets one.

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::{rdata::A, rdata::TXT, RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

#[derive(Debug, Clone)]
pub enum Mode {
    Records(Vec<Ipv4Addr>),
    ServFail,
    Silent,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    txt: Arc<Mutex<Option<String>>>,
    queries: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start(mode: Mode) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let txt = Arc::new(Mutex::new(None));
        let queries = Arc::new(Mutex::new(0));
        let task = tokio::spawn(serve(socket, mode.clone(), txt.clone(), queries.clone()));
        Self {
            addr,
            mode,
            txt,
            queries,
            task,
        }
    }

    /// The text of the `_grpc_config` TXT record, or none.
    pub fn set_txt(&self, text: Option<String>) {
        *self.txt.lock().unwrap() = text;
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn queries(&self) -> u64 {
        *self.queries.lock().unwrap()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    socket: UdpSocket,
    mode: Arc<Mutex<Mode>>,
    txt: Arc<Mutex<Option<String>>>,
    queries: Arc<Mutex<u64>>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        *queries.lock().unwrap() += 1;
        let mode = mode.lock().unwrap().clone();
        let txt = txt.lock().unwrap().clone();
        let mut response = Message::new(
            query.metadata.id,
            MessageType::Response,
            query.metadata.op_code,
        );
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        for q in &query.queries {
            response.add_query(q.clone());
        }
        match mode {
            Mode::Silent => continue,
            Mode::ServFail => response.metadata.response_code = ResponseCode::ServFail,
            Mode::Records(ips) => {
                for q in &query.queries {
                    let is_config = q.name().to_string().starts_with("_grpc_config.");
                    if let (RecordType::TXT, true, Some(text)) = (q.query_type(), is_config, &txt) {
                        // DNS strings hold at most 255 bytes: a long text is several of them.
                        let parts = text
                            .as_bytes()
                            .chunks(255)
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .collect();
                        response.add_answer(Record::from_rdata(
                            q.name().clone(),
                            1,
                            RData::TXT(TXT::new(parts)),
                        ));
                    }
                    if q.query_type() == RecordType::A {
                        for ip in &ips {
                            response.add_answer(Record::from_rdata(
                                q.name().clone(),
                                1,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
            }
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}
