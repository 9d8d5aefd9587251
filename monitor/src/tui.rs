//! The live `top` screen (ratatui): owners by traffic, refreshed every
//! second. Keys: ↑/↓ select, Enter expand/collapse an owner's flows,
//! s cycle sort, f firmware only, q quit. Fits an 80x24 adb shell.

use crate::flows::FlowRecord;
use crate::top::{self, OwnerRow};
use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState};
use ratatui::Frame;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SortKey {
    Bytes,
    Rate,
    Connects,
    Uid,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Bytes => SortKey::Rate,
            SortKey::Rate => SortKey::Connects,
            SortKey::Connects => SortKey::Uid,
            SortKey::Uid => SortKey::Bytes,
        }
    }
    fn name(self) -> &'static str {
        match self {
            SortKey::Bytes => "total",
            SortKey::Rate => "rate",
            SortKey::Connects => "connections",
            SortKey::Uid => "uid",
        }
    }
}

/// Screen state, independent of the terminal (unit tested).
pub struct View {
    pub rows: Vec<OwnerRow>,
    pub flows: Vec<FlowRecord>,
    pub sort: SortKey,
    pub firmware_only: bool,
    pub expanded: Option<u32>,
    pub selected: usize,
    pub error: Option<String>,
}

impl View {
    pub fn new() -> View {
        View {
            rows: Vec::new(),
            flows: Vec::new(),
            sort: SortKey::Bytes,
            firmware_only: false,
            expanded: None,
            selected: 0,
            error: None,
        }
    }

    pub fn visible(&self) -> Vec<&OwnerRow> {
        let mut rows: Vec<&OwnerRow> = self
            .rows
            .iter()
            .filter(|r| !self.firmware_only || r.firmware)
            .collect();
        match self.sort {
            SortKey::Bytes => rows.sort_by_key(|r| std::cmp::Reverse(r.tx_bytes)),
            SortKey::Rate => rows.sort_by(|a, b| b.rate_bps.total_cmp(&a.rate_bps)),
            SortKey::Connects => rows.sort_by_key(|r| std::cmp::Reverse(r.connects)),
            SortKey::Uid => rows.sort_by_key(|r| r.uid),
        }
        rows
    }

    /// Applies one key; returns false to quit.
    pub fn key(&mut self, code: KeyCode) -> bool {
        let count = self.visible().len();
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('f') => {
                self.firmware_only = !self.firmware_only;
                self.selected = 0;
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(count.saturating_sub(1))
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Enter => {
                let uid = self.visible().get(self.selected).map(|r| r.uid);
                self.expanded = if self.expanded == uid { None } else { uid };
            }
            _ => {}
        }
        true
    }

    pub fn draw(&self, frame: &mut Frame) {
        let [header, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let total: u64 = self.rows.iter().map(|r| r.tx_bytes).sum();
        let title = format!(
            "egressmon top  owners {}  sent {}  sort: {}{}",
            self.rows.len(),
            top::human_bytes(total as f64),
            self.sort.name(),
            if self.firmware_only {
                "  [firmware only]"
            } else {
                ""
            }
        );
        frame.render_widget(
            Paragraph::new(title).style(Style::default().add_modifier(Modifier::BOLD)),
            header,
        );
        let mut rows = Vec::new();
        for r in self.visible() {
            rows.push(Row::new(vec![
                r.uid.to_string(),
                r.owner.clone(),
                format!("{}{}", r.origin, if r.firmware { " FW" } else { "" }),
                top::human_bytes(r.rate_bps),
                top::human_bytes(r.tx_bytes as f64),
                r.connects.to_string(),
                r.destinations.to_string(),
                r.top_destinations.join(" "),
            ]));
            if self.expanded == Some(r.uid) {
                for f in self.flows.iter().filter(|f| f.uid == r.uid) {
                    let dst = if f.family == "ipv6" {
                        format!("[{}]:{}", f.dst, f.port)
                    } else {
                        format!("{}:{}", f.dst, f.port)
                    };
                    rows.push(
                        Row::new(vec![
                            String::new(),
                            format!("  {} {}", f.proto, f.comm.clone().unwrap_or_default()),
                            String::new(),
                            String::new(),
                            top::human_bytes(f.tx_bytes as f64),
                            f.connects.to_string(),
                            String::new(),
                            dst,
                        ])
                        .style(Style::default().add_modifier(Modifier::DIM)),
                    );
                }
            }
        }
        let widths = [
            Constraint::Length(7),
            Constraint::Length(16),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(3),
            Constraint::Min(16),
        ];
        let table = Table::new(rows, widths)
            .header(
                Row::new([
                    "UID", "OWNER", "ORIGIN", "RATE/s", "TOTAL", "CONN", "DST", "BUSIEST",
                ])
                .style(Style::default().add_modifier(Modifier::REVERSED)),
            )
            .block(Block::default().borders(Borders::NONE))
            .row_highlight_style(Style::default().add_modifier(Modifier::BOLD))
            .highlight_symbol(">");
        let mut state = TableState::default();
        state.select(self.selected_row_index());
        frame.render_stateful_widget(table, body, &mut state);
        let help = match &self.error {
            Some(e) => format!("error: {e}"),
            None => "q quit  s sort  f firmware only  Enter expand  ↑↓ select".to_string(),
        };
        frame.render_widget(Paragraph::new(Line::from(help)), footer);
    }

    /// Table row index of the selected owner (expanded flows take rows).
    fn selected_row_index(&self) -> Option<usize> {
        let visible = self.visible();
        if visible.is_empty() {
            return None;
        }
        let mut index = 0;
        for (i, r) in visible.iter().enumerate() {
            if i == self.selected {
                return Some(index);
            }
            index += 1;
            if self.expanded == Some(r.uid) {
                index += self.flows.iter().filter(|f| f.uid == r.uid).count();
            }
        }
        None
    }

    pub fn update(
        &mut self,
        flows: Vec<FlowRecord>,
        previous: &HashMap<u32, u64>,
        elapsed: Duration,
    ) {
        self.rows = top::with_rates(top::group(&flows), previous, elapsed);
        self.flows = flows;
        self.error = None;
        let count = self.visible().len();
        self.selected = self.selected.min(count.saturating_sub(1));
    }
}

impl Default for View {
    fn default() -> Self {
        View::new()
    }
}

pub fn run(listen: SocketAddr) -> Result<()> {
    let mut terminal = ratatui::init();
    let result = event_loop(&mut terminal, listen);
    ratatui::restore();
    result
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, listen: SocketAddr) -> Result<()> {
    let mut view = View::new();
    let mut previous: HashMap<u32, u64> = HashMap::new();
    let mut last = Instant::now() - Duration::from_secs(2);
    let mut sampled_at = Instant::now();
    loop {
        if last.elapsed() >= Duration::from_secs(1) {
            match top::sample(listen) {
                Ok(flows) => {
                    view.update(flows, &previous, sampled_at.elapsed());
                    previous = top::totals(&view.rows);
                    sampled_at = Instant::now();
                }
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            last = Instant::now();
        }
        terminal.draw(|f| view.draw(f))?;
        if event::poll(Duration::from_millis(200))? {
            if let Event::Key(key) = event::read()? {
                if key.kind == KeyEventKind::Press && !view.key(key.code) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn flow(uid: u32, owner: &str, firmware: bool, bytes: u64) -> FlowRecord {
        FlowRecord {
            uid,
            user: 0,
            app_id: uid,
            owner: owner.into(),
            packages: vec![],
            origin: if firmware { "platform" } else { "app" }.into(),
            firmware,
            comm: Some("curl".into()),
            pid: Some(1),
            cgroup_id: None,
            cgroup: None,
            unit: None,
            exe: None,
            cmdline: None,
            proto: "tcp".into(),
            family: "ipv4".into(),
            dst: "203.0.113.7".into(),
            port: 80,
            connects: 1,
            udp_sends: 0,
            tx_packets: 1,
            tx_bytes: bytes,
            first_seen: None,
            last_seen: None,
            host: None,
            host_source: None,
            country: None,
            asn: None,
            payload: "unknown".into(),
        }
    }

    #[test]
    fn keys_filter_sort_and_expand_in_80x24() {
        let mut view = View::new();
        view.update(
            vec![
                flow(10123, "com.example.app", false, 5000),
                flow(1001, "radio", true, 100),
            ],
            &HashMap::new(),
            Duration::from_secs(1),
        );
        assert_eq!(view.visible()[0].owner, "com.example.app");
        view.key(KeyCode::Char('f'));
        assert_eq!(view.visible().len(), 1);
        assert_eq!(view.visible()[0].owner, "radio");
        view.key(KeyCode::Enter);
        assert_eq!(view.expanded, Some(1001));
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        let lines: Vec<String> = screen
            .chars()
            .collect::<Vec<_>>()
            .chunks(80)
            .map(|l| l.iter().collect())
            .collect();
        let shown = lines.join("\n");
        assert!(
            shown.contains("radio")
                && shown.contains("platform FW")
                && shown.contains("203.0.113.7:80"),
            "{shown}"
        );
        assert!(!view.key(KeyCode::Char('q')));
    }
}
