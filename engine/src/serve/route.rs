//! Reads of views fed by a partitioned [`Source`]: keys of partitions owned here are
//! read locally, the others are forwarded, one `GetFeatures` per owning instance,
//! and the rows are put back in request order.
//!
//! A forwarded read carries the [`FORWARDED`] header and is answered from local
//! partitions only, so a read takes at most one hop even while partitions move.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;

use super::auth::TlsFiles;
use super::proto::features_client::FeaturesClient;
use super::proto::get_features_request::Keys;
use super::proto::{GetFeaturesRequest, GetFeaturesResponse, IntKeys, StringKeys};
use super::server::Shared;
use super::status::status;
use crate::ingest::keys::KeyValue;
use crate::online::ServedFrame;
use crate::sources::{PartialFrame, Source};

/// Metadata key marking a read another instance routed here.
pub(crate) const FORWARDED: &str = "panes-forwarded";

/// Where a read comes from: routed here by another instance, and the caller's
/// `authorization` header, which a read forwarded on carries to the owner.
#[derive(Debug)]
pub(crate) struct Origin {
    pub forwarded: bool,
    pub token: Option<tonic::metadata::AsciiMetadataValue>,
}

/// gRPC clients of the other instances, by address, connected on first use.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    clients: Mutex<HashMap<String, FeaturesClient<tonic::transport::Channel>>>,
    /// With TLS, how instances reach each other: they trust the client CA (else this
    /// instance's own certificate, shared by the group) and present their certificate.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Peers {
    pub(crate) fn new(tls: Option<&TlsFiles>) -> crate::error::Result<Peers> {
        Ok(Peers {
            clients: Mutex::default(),
            tls: tls.map(TlsFiles::peer_client).transpose()?,
        })
    }

    fn client(&self, addr: &str) -> Result<FeaturesClient<tonic::transport::Channel>, Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::internal(format!("owner address {addr:?}: {e}")))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("owner address {addr:?}: TLS: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect_lazy();
        let c = FeaturesClient::new(channel).max_decoding_message_size(usize::MAX);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// Reads `keys` of a source's view from whichever instances own their partitions:
/// the local engines for partitions owned here, one forwarded `GetFeatures` per other
/// owner. `forwarded` requests are answered from local partitions only (one hop).
pub(crate) async fn read(
    shared: &Arc<Shared>,
    source: &Arc<dyn Source>,
    keys: Vec<KeyValue>,
    at: Option<i64>,
    features: Vec<String>,
    origin: Origin,
) -> Result<ServedFrame, Status> {
    let forwarded = origin.forwarded;
    let spec = source.spec();
    let names: Vec<String> = if features.is_empty() {
        spec.features.iter().map(|f| f.name.clone()).collect()
    } else {
        // A sourced view is compiled in the engine too; its reads run on partitions.
        let compiled = shared
            .engine
            .compiled(&spec.name)
            .map_err(|e| status(e, "view"))?;
        for f in &features {
            compiled
                .feature_index(f)
                .map_err(|e| status(e, "features"))?;
        }
        features
    };
    let local = {
        let (source, keys, names) = (source.clone(), keys.clone(), names.clone());
        shared
            .on_reads_for(keys.len(), move || {
                source.read_local(&keys, at, &names, forwarded)
            })
            .await?
            .map_err(|e| status(e, "keys"))?
    };
    let mut rows = local.rows;
    let mut by_owner: BTreeMap<String, (Vec<i32>, Vec<usize>)> = BTreeMap::new();
    for (p, idx) in local.remote {
        let owner = source
            .owner_of(p)
            .filter(|o| o != source.advertise())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "view {:?}: partition {p} has no live owner yet (rebalancing); retry",
                    spec.name
                ))
            })?;
        let e = by_owner.entry(owner).or_default();
        e.0.push(p);
        e.1.extend(idx);
    }
    for (owner, (parts, idx)) in by_owner {
        let mut request = tonic::Request::new(GetFeaturesRequest {
            view: spec.name.clone(),
            keys: Some(request_keys(&keys, &idx)),
            features: names.clone(),
            at_ms: at,
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        if let Some(token) = &origin.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        let reply = shared
            .peers
            .client(&owner)?
            .get_features(request)
            .await
            .map_err(|s| {
                let code = match s.code() {
                    tonic::Code::InvalidArgument => tonic::Code::InvalidArgument,
                    _ => tonic::Code::Unavailable,
                };
                Status::new(
                    code,
                    format!(
                        "view {:?}: partitions {parts:?} are owned by {owner}, which answered: {}",
                        spec.name,
                        s.message()
                    ),
                )
            })?
            .into_inner();
        absorb_reply(&mut rows, &idx, &reply).map_err(|e| {
            Status::internal(format!("reply of {owner} does not fit the request: {e}"))
        })?;
    }
    Ok(rows.into_served(names))
}

/// The keys at `idx`, as a request's keys (all of one kind: the view's key column has
/// one type).
fn request_keys(keys: &[KeyValue], idx: &[usize]) -> Keys {
    use super::proto::{CompositeKeys, KeyPartValues, key_part_values::Values};
    if let Some(KeyValue::Tuple(first)) = keys.first() {
        // One column per part, each of one kind (the keys of a read have one shape).
        let all: Vec<usize> = (0..idx.len()).collect();
        let parts = (0..first.len())
            .map(|p| {
                let part: Vec<KeyValue> = idx
                    .iter()
                    .map(|&i| match &keys[i] {
                        KeyValue::Tuple(t) => t.get(p).cloned().unwrap_or(KeyValue::Int(0)),
                        other => other.clone(),
                    })
                    .collect();
                let values = match request_keys(&part, &all) {
                    Keys::StringKeys(s) => Values::Strings(s),
                    Keys::IntKeys(i) => Values::Ints(i),
                    Keys::CompositeKeys(_) => unreachable!("parts are not tuples"),
                };
                KeyPartValues {
                    values: Some(values),
                }
            })
            .collect();
        return Keys::CompositeKeys(CompositeKeys { parts });
    }
    if matches!(keys.first(), Some(KeyValue::Str(_))) {
        Keys::StringKeys(StringKeys {
            keys: idx
                .iter()
                .map(|&i| match &keys[i] {
                    KeyValue::Str(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        })
    } else {
        Keys::IntKeys(IntKeys {
            keys: idx
                .iter()
                .map(|&i| match &keys[i] {
                    KeyValue::Int(v) => i64::try_from(*v).unwrap_or(i64::MAX),
                    KeyValue::Str(_) | KeyValue::Tuple(_) => 0,
                })
                .collect(),
        })
    }
}

/// Fills rows `idx` of `rows` from another instance's reply, whose row `r` is the key
/// of row `idx[r]`.
fn absorb_reply(
    rows: &mut PartialFrame,
    idx: &[usize],
    r: &GetFeaturesResponse,
) -> Result<(), String> {
    let f = rows.features;
    if r.rows as usize != idx.len() || r.values.len() != idx.len() * f {
        return Err(format!(
            "{} rows × {} values for {} keys × {f} features",
            r.rows,
            r.values.len(),
            idx.len(),
        ));
    }
    // Strings join the frame's strings; values and list items become their indices.
    let mut strings: Vec<Option<&[String]>> = vec![None; f];
    for s in &r.strings {
        let c = s.feature as usize;
        if c >= f || rows.is_list[c] || s.values.len() != idx.len() {
            return Err(format!(
                "strings of feature {c}: {} for {} rows",
                s.values.len(),
                idx.len()
            ));
        }
        strings[c] = Some(&s.values);
    }
    // The string-valued features are strings whether or not these rows have any.
    for &c in &r.string_features {
        let c = c as usize;
        if c >= f {
            return Err(format!("string feature {c} of {f} features"));
        }
        rows.text[c] = true;
    }
    for (row, &i) in idx.iter().enumerate() {
        for c in 0..f {
            let j = row * f + c;
            let ok = r
                .validity
                .get(j / 8)
                .is_some_and(|b| b & (1 << (j % 8)) != 0);
            rows.values[i * f + c] = match (ok, strings[c]) {
                (true, Some(s)) => {
                    rows.text[c] = true;
                    rows.strings.push(s[row].clone());
                    (rows.strings.len() - 1) as f64
                }
                (true, None) => r.values[j],
                (false, _) => f64::NAN,
            };
            rows.valid[i * f + c] = ok;
        }
        for l in &r.lists {
            let (c, o) = (l.feature as usize, &l.offsets);
            let range = o
                .get(row)
                .zip(o.get(row + 1))
                .map(|(a, b)| *a as usize..*b as usize);
            let range = range.filter(|_| c < f);
            let items = if l.strings.is_empty() {
                range.and_then(|r| l.values.get(r)).map(<[f64]>::to_vec)
            } else {
                range.and_then(|r| l.strings.get(r)).map(|s| {
                    rows.text[c] = true;
                    let base = rows.strings.len();
                    rows.strings.extend_from_slice(s);
                    (base..rows.strings.len()).map(|i| i as f64).collect()
                })
            };
            let Some(items) = items else {
                return Err(format!("list of feature {c}: offsets out of range"));
            };
            if rows.lists.is_empty() {
                rows.lists.resize(rows.values.len(), Vec::new());
            }
            rows.lists[i * f + c] = items;
        }
        rows.latest[i] = r.latest_event_ms.get(row).copied().unwrap_or(i64::MIN);
        rows.window_events[i] = r.window_events.get(row).copied().unwrap_or(0);
    }
    rows.at = rows.at.max(Some(r.at_ms));
    rows.version += r.state_version;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::proto::{FeatureList, FeatureStrings};

    /// A reply for 2 keys of two features: `first` of strings and a `top_k` list of
    /// strings.
    fn reply() -> GetFeaturesResponse {
        GetFeaturesResponse {
            features: vec!["first".into(), "top".into()],
            rows: 2,
            values: vec![f64::NAN, 2.0, f64::NAN, 0.0],
            // Row 0: both valid; row 1: `first` null, the list valid (empty).
            validity: vec![0b1011],
            latest_event_ms: vec![5, i64::MIN],
            window_events: vec![3, 0],
            at_ms: 9,
            state_version: 1,
            lists: vec![FeatureList {
                feature: 1,
                offsets: vec![0, 2, 2],
                values: vec![],
                strings: vec!["b".into(), "".into()],
            }],
            strings: vec![FeatureStrings {
                feature: 0,
                values: vec!["é".into(), String::new()],
            }],
            string_features: vec![0, 1],
        }
    }

    #[test]
    fn a_reply_s_strings_join_the_frame() {
        let mut rows = PartialFrame::new(3, vec![false, true]);
        // Another part's string first, so the reply's must be rebased.
        rows.strings.push("x".into());
        absorb_reply(&mut rows, &[2, 0], &reply()).unwrap();
        let frame = rows.into_served(vec!["first".into(), "top".into()]).frame;
        assert_eq!(frame.text, [true, true]);
        let text = |v: f64| frame.strings[v as usize].as_str();
        assert!(frame.valid[[2, 0]] && !frame.valid[[0, 0]]);
        assert_eq!(text(frame.values[[2, 0]]), "é");
        let list = |r: usize| {
            frame
                .list(r, 1)
                .iter()
                .map(|&v| text(v))
                .collect::<Vec<_>>()
        };
        assert_eq!(list(2), ["b", ""]);
        assert!(list(0).is_empty());
        assert_eq!(frame.values[[2, 1]], 2.0, "a list's length");
    }

    #[test]
    fn a_reply_with_strings_out_of_shape_is_refused() {
        let mut r = reply();
        r.strings[0].values.pop();
        let mut rows = PartialFrame::new(2, vec![false, true]);
        let e = absorb_reply(&mut rows, &[0, 1], &r).unwrap_err();
        assert!(e.contains("strings of feature 0: 1 for 2 rows"), "{e}");
        let mut r = reply();
        r.strings[0].feature = 1; // a list-valued feature
        assert!(absorb_reply(&mut rows, &[0, 1], &r).is_err());
        let mut r = reply();
        r.lists[0].offsets = vec![0, 3, 3];
        let e = absorb_reply(&mut rows, &[0, 1], &r).unwrap_err();
        assert!(e.contains("offsets out of range"), "{e}");
        let mut r = reply();
        r.string_features.push(2);
        let e = absorb_reply(&mut rows, &[0, 1], &r).unwrap_err();
        assert!(e.contains("string feature 2 of 2"), "{e}");
    }

    /// Features of strings stay strings when no row of the reply has one: a null
    /// `first`, and a `top_k` with no list at all (as an owner that sends lists only
    /// when some row has an item would reply).
    #[test]
    fn string_features_without_values_are_still_strings() {
        let mut r = reply();
        r.values = vec![f64::NAN, 0.0, f64::NAN, 0.0];
        r.validity = vec![0b1010];
        r.lists.clear();
        r.strings[0].values = vec![String::new(); 2];
        let mut rows = PartialFrame::new(2, vec![false, true]);
        absorb_reply(&mut rows, &[0, 1], &r).unwrap();
        let frame = rows.into_served(vec!["first".into(), "top".into()]).frame;
        assert_eq!(frame.text, [true, true]);
        assert!(frame.strings.is_empty());
    }
}
