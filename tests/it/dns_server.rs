//! A real DNS server on a loopback UDP socket whose answers the test changes: A records with a
//! 1 s TTL, an empty answer, SERVFAIL, or silence (a server that is down).

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::{rdata::A, RData, Record, RecordType};
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
    queries: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start(mode: Mode) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let queries = Arc::new(Mutex::new(0));
        let task = tokio::spawn(serve(socket, mode.clone(), queries.clone()));
        Self {
            addr,
            mode,
            queries,
            task,
        }
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

async fn serve(socket: UdpSocket, mode: Arc<Mutex<Mode>>, queries: Arc<Mutex<u64>>) {
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
