//! A small hand-written SVG line chart — enough for "latency vs subscribers" and
//! "commits/s vs writers" — so the bench needs no plotting crate (plotters pulls in font
//! and image stacks we would only use for a dozen lines of output).
//!
//! Axes are linear or log10; x may instead be categorical (evenly spaced labels).

use std::fmt::Write as _;

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// 0 solid, 1 dashed, 2 dotted: tells metrics of one group apart.
    pub dash: u8,
    /// Colour index: series of one target share a colour.
    pub group: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    /// When set, x values are indexes into these labels.
    pub x_categories: Option<Vec<String>>,
    /// With categories: grouped bars (one per series in each category) instead of lines.
    pub bars: bool,
    pub series: Vec<Series>,
}

const W: f64 = 790.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (if log { 1.0 } else { 0.0 }, 1.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            // Smallest 1/2/5 × 10^k at or above the data, so 1..16 ends at 20, not 100.
            let decade = 10f64.powf(hi.log10().floor());
            hi = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * decade)
                .find(|v| *v >= hi * 0.9999)
                .unwrap_or(decade * 10.0);
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            lo = lo.min(0.0);
            let step = nice_step((hi - lo).max(1e-9) / 5.0);
            hi = (hi / step).ceil() * step;
            if hi <= lo {
                hi = lo + step;
            }
        }
        Self { lo, hi, log }
    }

    /// 0..=1 position of `v`.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = Vec::new();
            let mut v = self.lo;
            let decades = (self.hi / self.lo).log10().ceil() as i32;
            while v <= self.hi * 1.0001 {
                t.push(v);
                if decades <= 2 {
                    for m in [2.0, 5.0] {
                        if v * m < self.hi {
                            t.push(v * m);
                        }
                    }
                }
                v *= 10.0;
            }
            t.sort_by(f64::total_cmp);
            t
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut t = Vec::new();
            let mut v = (self.lo / step).ceil() * step;
            while v <= self.hi + step * 1e-6 {
                t.push(v);
                v += step;
            }
            t
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let m = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    pub fn render(&self) -> String {
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let categorical = self.x_categories.is_some();
        let xa = if let Some(c) = &self.x_categories {
            Axis {
                lo: -0.5,
                hi: c.len() as f64 - 0.5,
                log: false,
            }
        } else {
            Axis::fit(all().map(|p| p.0), self.x_log)
        };
        let ya = Axis::fit(all().map(|p| p.1), self.y_log);
        let px = |x: f64| LEFT + xa.frac(x) * pw;
        let py = |y: f64| TOP + (1.0 - ya.frac(y)) * ph;

        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        for t in ya.ticks() {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                fmt_num(t)
            );
        }
        let xticks: Vec<(f64, String)> = match &self.x_categories {
            Some(c) => c
                .iter()
                .enumerate()
                .map(|(i, l)| (i as f64, l.clone()))
                .collect(),
            None => xa.ticks().into_iter().map(|t| (t, fmt_num(t))).collect(),
        };
        for (t, label) in xticks {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                esc(&label)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            LEFT + pw / 2.0,
            H - 18.0,
            esc(&self.x_label),
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        let bars = categorical && self.bars;
        // Each category's slot is 1 wide on the x axis; its bars share 80 % of it.
        let bar_w = 0.8 / self.series.len().max(1) as f64;
        for (i, se) in self.series.iter().enumerate() {
            let color = COLORS[se.group % COLORS.len()];
            if bars {
                for &(x, y) in se
                    .points
                    .iter()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                {
                    let x0 = px(x - 0.4 + bar_w * i as f64);
                    let x1 = px(x - 0.4 + bar_w * (i + 1) as f64);
                    let (top, base) = (py(y), py(ya.lo.max(0.0)));
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="{}"><title>{} {}</title></rect>"#,
                        top.min(base),
                        (x1 - x0 - 1.0).max(1.0),
                        (base - top).abs(),
                        if se.dash == 0 { "0.9" } else { "0.45" },
                        esc(&se.name),
                        fmt_num(y)
                    );
                }
                let ly = TOP + 10.0 + i as f64 * 18.0;
                let lx = LEFT + pw + 12.0;
                let _ = writeln!(
                    s,
                    r#"<rect x="{lx}" y="{}" width="22" height="10" fill="{color}" fill-opacity="{}"/><text x="{}" y="{}">{}</text>"#,
                    ly - 5.0,
                    if se.dash == 0 { "0.9" } else { "0.45" },
                    lx + 28.0,
                    ly + 4.0,
                    esc(&se.name)
                );
                continue;
            }
            let dash = match se.dash {
                0 => "",
                1 => r#" stroke-dasharray="7,4""#,
                _ => r#" stroke-dasharray="2,3""#,
            };
            let pts: Vec<String> = se
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.y_log || p.1 > 0.0))
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if pts.len() > 1 {
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                    pts.join(" ")
                );
            }
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
            }
            let ly = TOP + 10.0 + i as f64 * 18.0;
            let lx = LEFT + pw + 12.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                esc(&se.name)
            );
        }
        if categorical && self.series.is_empty() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
                LEFT + pw / 2.0,
                TOP + ph / 2.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_log_chart() {
        let c = Chart {
            title: "t <x>".into(),
            x_label: "subscribers".into(),
            y_label: "ms".into(),
            x_log: true,
            y_log: true,
            x_categories: None,
            bars: false,
            series: vec![Series {
                name: "a".into(),
                points: vec![(100.0, 0.5), (10_000.0, 40.0)],
                dash: 0,
                group: 0,
            }],
        };
        let svg = c.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("polyline"));
        assert!(svg.contains("t &lt;x&gt;"));
        assert!(svg.contains(">10k<"));
    }

    #[test]
    fn renders_grouped_bars() {
        let series = |name: &str, group| Series {
            name: name.into(),
            points: vec![(0.0, 2.0), (1.0, 8.0)],
            dash: 0,
            group,
        };
        let c = Chart {
            x_categories: Some(vec!["quiet".into(), "subs".into()]),
            bars: true,
            series: vec![series("a", 0), series("b", 1)],
            ..Default::default()
        };
        let svg = c.render();
        assert_eq!(svg.matches("<rect x=").count(), 2 * 2 + 2 + 1, "{svg}");
        assert!(!svg.contains("polyline"));
        assert!(svg.contains(">subs<"));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(17.0), 20.0);
    }
}
