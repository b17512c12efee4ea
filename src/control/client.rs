//! A control socket client: one request line out, one reply line in.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::protocol::Request;

/// How long a reply may take. Commands answer at once, except `sync-mode`
/// and `power-cut`, which first write out what the engine holds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control socket connection failed")]
    Io(#[from] io::Error),
    #[error("the daemon closed the control connection")]
    Closed,
    #[error("the daemon's reply is not what this twinsum understands")]
    Reply(#[from] serde_json::Error),
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// One connection to a daemon's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Send `req` and parse the reply as `T` (which ignores `ok`).
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ClientError::Closed);
        }
        let value: serde_json::Value = serde_json::from_str(&reply)?;
        if value.get("ok") != Some(&serde_json::Value::Bool(true)) {
            let why = value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the daemon refused without saying why");
            return Err(ClientError::Refused(why.to_owned()));
        }
        Ok(serde_json::from_value(value)?)
    }
}
