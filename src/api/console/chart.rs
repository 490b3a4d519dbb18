//! Bar charts drawn on the server as inline SVG (no charting library, no script): one bar
//! per minute, scaled to the largest.

/// A chart the `chart.html` template draws.
pub struct Chart {
    pub label: String,
    pub width: u32,
    pub height: u32,
    pub max: u64,
    pub bars: Vec<Bar>,
}

pub struct Bar {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    /// The CSS class (its colour).
    pub class: &'static str,
    /// The tooltip: which minute, how many.
    pub title: String,
}

/// Bar width and gap, in the viewBox's units.
const BAR: u32 = 4;
const GAP: u32 = 1;
const HEIGHT: u32 = 40;

/// `values`, oldest first, one a minute ending now; `class` colours the bars.
pub fn per_minute(label: String, values: &[u64], class: &'static str) -> Chart {
    let max = values.iter().copied().max().unwrap_or(0);
    let n = values.len() as u32;
    let bars = values
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0)
        .map(|(i, v)| {
            // At least one unit tall, so a single event is seen.
            let h = ((*v as f64 / max.max(1) as f64) * f64::from(HEIGHT)).ceil() as u32;
            let h = h.clamp(1, HEIGHT);
            let ago = n.saturating_sub(i as u32 + 1);
            Bar {
                x: i as u32 * (BAR + GAP),
                y: HEIGHT - h,
                w: BAR,
                h,
                class,
                title: format!("-{ago} min: {v}"),
            }
        })
        .collect();
    Chart {
        label,
        width: n.max(1) * (BAR + GAP),
        height: HEIGHT,
        max,
        bars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_scaled_to_the_largest() {
        let chart = per_minute("x".into(), &[0, 1, 4, 0], "ok");
        assert_eq!(chart.max, 4);
        assert_eq!(chart.width, 20);
        assert_eq!(chart.bars.len(), 2);
        assert_eq!(chart.bars[0].h, 10);
        assert_eq!(chart.bars[1].h, 40);
        assert_eq!(chart.bars[1].y, 0);
        assert_eq!(chart.bars[1].x, 10);
        assert_eq!(chart.bars[1].title, "-1 min: 4");
        assert!(per_minute("y".into(), &[], "ok").bars.is_empty());
    }
}
