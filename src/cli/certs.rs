//! `meshlb certs`: throw-away certificates for demos and tests (a CA, a server certificate, a
//! client certificate, an admin client certificate). For production, use cert-manager or your own PKI.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write ca.pem, server.pem, server.key, client.pem, client.key, admin.pem and admin.key.
    #[arg(long, env = "MESHLB_CERTS_OUT", default_value = "certs")]
    out: PathBuf,
    /// Names and addresses the server certificate is valid for, comma-separated
    /// (default: localhost, 127.0.0.1-127.0.0.9 and the Kubernetes Service names).
    #[arg(long, env = "MESHLB_CERTS_NAMES", value_delimiter = ',')]
    names: Vec<String>,
}

/// The names `meshlb up --tls` and `certs` use unless told otherwise.
pub fn default_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    names.extend((1..=9).map(|i| format!("127.0.0.{i}")));
    names.push("users.meshlb.svc.cluster.local".into());
    names.push("front.meshlb.svc.cluster.local".into());
    names
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let names = if args.names.is_empty() {
        default_names()
    } else {
        args.names
    };
    let paths =
        crate::tls::write_certs(&args.out, &names).map_err(|e| super::UsageError(e.to_string()))?;
    println!("CA           {}", paths.ca.display());
    println!(
        "server       {} {}",
        paths.server_cert.display(),
        paths.server_key.display()
    );
    println!(
        "client       {} {}",
        paths.client_cert.display(),
        paths.client_key.display()
    );
    println!(
        "admin        {} {}  (name {}, for --admin-allow)",
        paths.admin_cert.display(),
        paths.admin_key.display(),
        crate::tls::ADMIN_IDENTITY
    );
    println!("valid for    {}", names.join(", "));
    println!(
        "replica:     meshlb replica --tls-cert {} --tls-key {} [--tls-client-ca {} --admin-allow {}]",
        paths.server_cert.display(),
        paths.server_key.display(),
        paths.ca.display(),
        crate::tls::ADMIN_IDENTITY
    );
    println!(
        "client:      meshlb client --target ... --tls-ca {} [--tls-cert {} --tls-key {}]",
        paths.ca.display(),
        paths.client_cert.display(),
        paths.client_key.display()
    );
    Ok(ExitCode::SUCCESS)
}
