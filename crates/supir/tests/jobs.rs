//! `supir::jobs`: queue order and capacity, events and their replay, cancel of queued and
//! running jobs, close and pruning.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use supir::jobs::*;

#[test]
fn lifecycle_events_cancel_and_prune() {
    let q = JobQueue::<u32>::new(2);
    let (a, pa) = q.submit(1).unwrap();
    let (b, pb) = q.submit(2).unwrap();
    assert_eq!((pa, pb), (0, 1));
    assert_eq!(q.submit(3), Err(SubmitError::Full));
    let (tx, rx) = mpsc::channel();
    let past = q
        .subscribe(&a, None, Box::new(move |ev| tx.send(ev.clone()).is_ok()))
        .unwrap();
    assert_eq!(past.len(), 1);
    assert_eq!(past[0].status, JobStatus::Queued);
    // Cancel the queued b: dropped at once with its payload.
    assert_eq!(q.cancel(&b), Some((JobStatus::Canceled, Some(2))));
    let run = q.next().unwrap();
    assert_eq!((run.id.clone(), run.payload), (a.clone(), 1));
    let mut m = ProgressMeter::new("tiles", 2);
    q.progress(&a, m.tick());
    assert_eq!(q.cancel(&a), Some((JobStatus::Processing, None)));
    assert!(run.cancel.is_canceled());
    assert!(run.cancel.check().is_err());
    q.finish(&a, Outcome::Failed("stopped".into()));
    let got: Vec<JobEvent> = rx.try_iter().collect();
    let statuses: Vec<_> = got.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Processing,
            JobStatus::Processing,
            JobStatus::Canceled
        ]
    );
    assert_eq!(got[1].progress.as_ref().unwrap().step, 1);
    assert_eq!(got.last().unwrap().seq, 4);
    // Replay after event 2.
    let past = q.subscribe(&a, Some(2), Box::new(|_| true)).unwrap();
    assert_eq!(past.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(q.prune(Duration::from_secs(3600), 1), vec![b]);
    assert_eq!(q.prune(Duration::ZERO, 10), vec![a]);
    assert!(JobId::parse("0123456789abcdef").is_some());
    assert!(JobId::parse("../etc/passwd").is_none());
}

#[test]
fn close_cancels_queued_and_stops_worker() {
    let q = Arc::new(JobQueue::<u32>::new(4));
    let (a, _) = q.submit(1).unwrap();
    let run = q.next().unwrap();
    let (b, _) = q.submit(2).unwrap();
    let (dropped, running) = q.close();
    assert_eq!(dropped, vec![(b.clone(), 2)]);
    assert_eq!(running, Some(a.clone()));
    assert!(run.cancel.is_canceled());
    assert_eq!(q.info(&b).unwrap().status, JobStatus::Canceled);
    assert_eq!(q.submit(3), Err(SubmitError::Closed));
    assert!(q.next().is_none());
}

#[test]
fn realesrgan_stops_at_the_next_tile_once_canceled() {
    use supir::pipelines::realesrgan::{RealEsrgan, Tiling, UpscaleOptions};
    let model = RealEsrgan::embedded(&candle_core::Device::Cpu).unwrap();
    let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(12, 8, |x, y| {
        image::Rgb([20 * x as u8, 30 * y as u8, 77])
    }));
    let opts = UpscaleOptions {
        tiling: Tiling { tile: 4, pad: 2 },
        outscale: 4.0,
        alpha: Default::default(),
    };
    // Not canceled: the same image as the plain call.
    let token = CancelToken::new();
    let mut n = 0;
    let a = model
        .upscale_image_cancellable(&img, &opts, Some(&token), &mut || n += 1)
        .unwrap();
    let b = model.upscale_image(&img, &opts, &mut || {}).unwrap();
    assert_eq!(a, b);
    assert_eq!(n, 6);
    // Canceled after the second tile: no third tile runs.
    let mut n = 0;
    let t = token.clone();
    let r = model.upscale_image_cancellable(&img, &opts, Some(&token), &mut || {
        n += 1;
        if n == 2 {
            t.cancel();
        }
    });
    assert!(matches!(r, Err(supir::Error::Canceled)), "{r:?}");
    assert_eq!(n, 2);
    // A pad larger than any image is the whole image as context, not an overflow.
    let huge = UpscaleOptions {
        tiling: Tiling {
            tile: 4,
            pad: usize::MAX,
        },
        ..opts
    };
    let c = model.upscale_image(&img, &huge, &mut || {}).unwrap();
    let whole = UpscaleOptions {
        tiling: Tiling::NONE,
        ..opts
    };
    assert_eq!(c, model.upscale_image(&img, &whole, &mut || {}).unwrap());
}
