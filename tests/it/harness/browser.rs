//! A `tests/browser/*.mjs` script driving headless Debian Chromium through playwright-core.
//! Each script prints one JSON object per line for what the page saw; the test reads them.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// A running browser script (killed when dropped).
pub struct BrowserScript {
    node: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// How long one report may take (a first Chromium start on a loaded runner is slow).
    wait: Duration,
}

impl BrowserScript {
    /// Runs `tests/browser/<name>` with `args`; each report may take up to `wait`.
    pub fn start(name: &str, args: &[&str], wait: Duration) -> BrowserScript {
        let script = format!("{}/tests/browser/{name}", env!("CARGO_MANIFEST_DIR"));
        let mut node = tokio::process::Command::new("node")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let lines = BufReader::new(node.stdout.take().expect("piped stdout")).lines();
        BrowserScript { node, lines, wait }
    }

    /// The next report of the page.
    pub async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(self.wait, self.lines.next_line())
            .await
            .expect("the browser reported in time")
            .expect("the browser script's output is readable")
            .expect("the browser script is still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Waits for a script that ends by itself.
    pub async fn wait(mut self) {
        let _ = self.node.wait().await;
    }

    /// Ends the script (and its browser).
    pub async fn stop(mut self) {
        let _ = self.node.kill().await;
    }
}
