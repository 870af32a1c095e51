//! Hand-written SVG bar charts for bench results: no plotting crate, just text.
//!
//! [`bars`] draws one grouped bar chart into a rectangle of a page; [`document`] wraps
//! any number of them into a page with a title. Every bench can use both.

use std::fmt::Write as _;

/// A bar chart: for each category (a group along the x axis), one bar per series.
pub struct BarChart {
    pub title: String,
    /// Shown on the y axis, e.g. "Gbit/s".
    pub unit: String,
    /// Group labels along the x axis.
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    /// `values[category][series]`; `None` draws "n/a" where the bar would be.
    pub values: Vec<Vec<Option<f64>>>,
    /// Decimals in the value printed above each bar.
    pub decimals: usize,
}

pub struct Series {
    pub name: String,
    /// Any SVG colour, e.g. "#2a9d8f".
    pub color: String,
}

impl Series {
    pub fn new(name: &str, color: &str) -> Self {
        Self {
            name: name.to_owned(),
            color: color.to_owned(),
        }
    }
}

const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

/// One chart as an SVG `<g>` element filling the rectangle at (`x`, `y`) of size `w`×`h`.
pub fn bars(chart: &BarChart, x: f64, y: f64, w: f64, h: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "<g transform=\"translate({x:.1},{y:.1})\" {FONT}>");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"18\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        w / 2.0,
        escape(&chart.title)
    );
    // The plot area, inside margins for the axis labels, title and legend.
    let legend = chart.series.len() > 1;
    let (left, right, top, bottom) = (58.0, 12.0, if legend { 52.0 } else { 36.0 }, 34.0);
    let (pw, ph) = ((w - left - right).max(1.0), (h - top - bottom).max(1.0));
    if legend {
        let mut lx = left;
        for series in &chart.series {
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.1}\" y=\"28\" width=\"12\" height=\"12\" fill=\"{}\"/>",
                escape(&series.color)
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"38\" font-size=\"12\">{}</text>",
                lx + 16.0,
                escape(&series.name)
            );
            lx += 28.0 + 7.0 * series.name.chars().count() as f64;
        }
    }
    let max = chart
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max);
    let (top_value, step) = nice_axis(max);
    let scale = ph / top_value;
    let _ = writeln!(s, "<g transform=\"translate({left:.1},{top:.1})\">");
    // Grid lines and y labels.
    let mut v = 0.0;
    while v <= top_value * (1.0 + 1e-9) {
        let gy = ph - v * scale;
        let _ = writeln!(
            s,
            "<line x1=\"0\" y1=\"{gy:.1}\" x2=\"{pw:.1}\" y2=\"{gy:.1}\" stroke=\"#ddd\" stroke-width=\"1\"/>"
        );
        let _ = writeln!(
            s,
            "<text x=\"-6\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" fill=\"#555\">{}</text>",
            gy + 4.0,
            axis_label(v, step)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(-44,{:.1}) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\" fill=\"#333\">{}</text>",
        ph / 2.0,
        escape(&chart.unit)
    );
    // Bars, grouped by category.
    let groups = chart.categories.len().max(1) as f64;
    let group_w = pw / groups;
    let n = chart.series.len().max(1) as f64;
    let bar_w = (group_w * 0.75 / n).min(70.0);
    for (i, category) in chart.categories.iter().enumerate() {
        let gx = group_w * i as f64 + (group_w - bar_w * n) / 2.0;
        for (j, series) in chart.series.iter().enumerate() {
            let bx = gx + bar_w * j as f64;
            let cx = bx + bar_w / 2.0;
            match chart
                .values
                .get(i)
                .and_then(|v| v.get(j))
                .copied()
                .flatten()
            {
                Some(value) => {
                    let bh = (value.max(0.0) * scale).max(1.0);
                    let _ = writeln!(
                        s,
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                        bx + 1.0,
                        ph - bh,
                        bar_w - 2.0,
                        escape(&series.color),
                        escape(category),
                        escape(&series.name)
                    );
                    let _ = writeln!(
                        s,
                        "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{:.*}</text>",
                        ph - bh - 4.0,
                        chart.decimals,
                        value
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#a00\">n/a</text>",
                        ph - 4.0
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">{}</text>",
            group_w * (i as f64 + 0.5),
            ph + 20.0,
            escape(category)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"0\" y1=\"{ph:.1}\" x2=\"{pw:.1}\" y2=\"{ph:.1}\" stroke=\"#333\" stroke-width=\"1\"/>"
    );
    s.push_str("</g>\n</g>\n");
    s
}

/// A whole SVG page: a title line, an optional subtitle, then `parts` (from [`bars`]).
pub fn document(width: f64, height: f64, title: &str, subtitle: &str, parts: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" {FONT} font-size=\"17\" font-weight=\"bold\">{}</text>",
        width / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"44\" text-anchor=\"middle\" {FONT} font-size=\"12\" fill=\"#555\">{}</text>",
        width / 2.0,
        escape(subtitle)
    );
    for p in parts {
        s.push_str(p);
    }
    s.push_str("</svg>\n");
    s
}

/// The axis top (a "nice" number at or above `max`) and the step between grid lines.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn axis_label(v: f64, step: f64) -> String {
    // As many decimals as the step needs (0.25 → 2), at most 3.
    let decimals = (0..3)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled.round() - scaled).abs() < 1e-6
        })
        .unwrap_or(3) as usize;
    format!("{v:.decimals$}")
}

/// Text for SVG content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element is closed in order; returns the element count.
    fn balanced(svg: &str) -> usize {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = 0;
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("every < has its >") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "a tag inside a tag: {tag}");
            rest = &rest[close + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                elements += 1;
                if !tag.ends_with('/') {
                    stack.push(
                        tag.split_whitespace()
                            .next()
                            .expect("a tag name")
                            .to_owned(),
                    );
                }
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(!rest.contains('>'), "a stray > after the last tag");
        elements
    }

    #[test]
    fn a_page_of_two_charts_is_well_formed_and_labelled() {
        let tput = BarChart {
            title: "Throughput".into(),
            unit: "Gbit/s".into(),
            categories: vec!["veth".into(), "bridge".into(), "hypha".into()],
            series: vec![Series::new("median", "#2a9d8f")],
            values: vec![vec![Some(41.234)], vec![Some(30.0)], vec![None]],
            decimals: 1,
        };
        let lat = BarChart {
            title: "Latency <1 B RR>".into(),
            unit: "µs".into(),
            categories: tput.categories.clone(),
            series: vec![Series::new("p50", "#457b9d"), Series::new("p99", "#e76f51")],
            values: vec![
                vec![Some(12.0), Some(30.5)],
                vec![Some(14.0), Some(33.0)],
                vec![None, None],
            ],
            decimals: 1,
        };
        let svg = document(
            900.0,
            400.0,
            "Hypha & friends",
            "kernel x",
            &[
                bars(&tput, 0.0, 50.0, 450.0, 350.0),
                bars(&lat, 450.0, 50.0, 450.0, 350.0),
            ],
        );
        assert!(svg.starts_with("<?xml"));
        assert!(balanced(&svg) > 20);
        for label in [
            "veth", "bridge", "hypha", "Gbit/s", "µs", "p50", "p99", "41.2", "30.5", "n/a",
        ] {
            assert!(svg.contains(label), "{label} is missing");
        }
        assert!(svg.contains("Hypha &amp; friends"));
        assert!(svg.contains("Latency &lt;1 B RR&gt;"));
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_axis(41.2), (60.0, 20.0));
        assert_eq!(nice_axis(9.0), (10.0, 2.5));
        assert_eq!(nice_axis(0.0), (1.0, 0.25));
        assert_eq!(axis_label(0.75, 0.25), "0.75");
        assert_eq!(axis_label(0.5, 0.5), "0.5");
        assert_eq!(axis_label(20.0, 5.0), "20");
    }
}
