//! Writes the bids of a Nexmark event stream (the `nexmark` crate's generator, default
//! configuration, fixed base time) as an Arrow IPC file, for the benchmark harness:
//!
//! ```sh
//! cargo run -p panes-bench --bin nexmark -- --events 10000000 --out bids.arrow
//! ```
//!
//! Columns: `auction`, `bidder`, `price` (Int64), `date_time` (Timestamp ms, UTC) and
//! `all` (Int64, always 0: a key for the queries over every bid).

use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use nexmark::EventGenerator;
use nexmark::config::NexmarkConfig;
use nexmark::event::Event;
use panes_bench::arg;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = arg("--events", "1000000").parse()?;
    let out = arg("--out", "bids.arrow");
    let config = NexmarkConfig {
        base_time: 1_767_225_600_000, // 2026-01-01T00:00:00Z
        ..Default::default()
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("bidder", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new(
            "date_time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("all", DataType::Int64, false),
    ]));
    let mut generator = EventGenerator::new(config);
    let mut batches = Vec::new();
    let mut left = events;
    while left > 0 {
        let n = left.min(1 << 20);
        left -= n;
        let (mut auction, mut bidder, mut price, mut ts) = (vec![], vec![], vec![], vec![]);
        for event in generator.by_ref().take(n) {
            if let Event::Bid(b) = event {
                auction.push(b.auction as i64);
                bidder.push(b.bidder as i64);
                price.push(b.price as i64);
                ts.push(b.date_time as i64);
            }
        }
        let rows = auction.len();
        batches.push(RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(auction)),
                Arc::new(Int64Array::from(bidder)),
                Arc::new(Int64Array::from(price)),
                Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
                Arc::new(Int64Array::from(vec![0; rows])),
            ],
        )?);
    }
    panes_engine::offline::io::write_file(std::path::Path::new(&out), &schema, &batches)?;
    let bids: usize = batches.iter().map(RecordBatch::num_rows).sum();
    eprintln!("{events} Nexmark events, {bids} bids → {out}");
    Ok(())
}
