//! The volatile device's model, cut by cut.

use std::sync::Arc;

use super::testing::{FaultInjection, Fuse};
use super::*;
use crate::io::MemDevice;

const S: usize = SECTOR_SIZE as usize;

fn read(dev: &dyn Device, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

fn sector_of(durable: &[u8], sector: usize) -> Vec<u8> {
    durable[sector * S..(sector + 1) * S].to_vec()
}

#[test]
fn reads_see_cached_writes_but_durable_image_does_not() {
    let dev = VolatileDevice::zeroed(8 * SECTOR_SIZE);
    dev.write_at(&[7; 2 * S], SECTOR_SIZE).unwrap();
    assert_eq!(read(&dev, SECTOR_SIZE, 2 * S), vec![7; 2 * S]);
    assert!(dev.durable_snapshot().unwrap().iter().all(|&b| b == 0));
    assert_eq!(dev.cached_sectors(), 2);
}

#[test]
fn sync_makes_the_newest_version_durable() {
    let dev = VolatileDevice::zeroed(8 * SECTOR_SIZE);
    dev.write_at(&[1; S], 0).unwrap();
    dev.write_at(&[2; S], 0).unwrap();
    dev.write_at(&[3; S], 3 * SECTOR_SIZE).unwrap();
    dev.sync().unwrap();
    assert_eq!(dev.cached_sectors(), 0);
    let durable = dev.durable_snapshot().unwrap();
    assert_eq!(sector_of(&durable, 0), vec![2; S]);
    assert_eq!(sector_of(&durable, 3), vec![3; S]);
    // Nothing is left for a power cut to lose.
    let report = dev.power_cut(1).unwrap();
    assert!(report.sectors.is_empty());
    assert_eq!(dev.durable_snapshot().unwrap(), durable);
    assert_eq!(dev.stats().syncs, 1);
    assert_eq!(dev.stats().writes, 3);
}

#[test]
fn power_cut_keeps_or_loses_each_sector_independently() {
    // 64 sectors, each written once: a power cut must keep some and
    // lose some (for a fixed seed), and each sector must be whole.
    let dev = VolatileDevice::zeroed(64 * SECTOR_SIZE);
    dev.write_at(&[9; 64 * S], 0).unwrap();
    let report = dev.power_cut(42).unwrap();
    assert_eq!(report.sectors.len(), 64);
    let durable = dev.durable_snapshot().unwrap();
    let mut kept = 0;
    for (sector, fate) in &report.sectors {
        let bytes = sector_of(&durable, *sector as usize);
        match fate {
            Fate::Durable => assert_eq!(bytes, vec![0; S]),
            Fate::Version { index: 0, of: 1 } => {
                assert_eq!(bytes, vec![9; S]);
                kept += 1;
            }
            other => panic!("impossible fate {other:?}"),
        }
    }
    assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    assert_eq!(report.kept_latest(), kept);
    assert_eq!(report.reverted(), 64 - kept);
    // The device goes on from the survivors with an empty cache.
    assert_eq!(dev.cached_sectors(), 0);
    assert_eq!(read(&dev, 0, 64 * S), durable);
}

#[test]
fn power_cut_can_keep_an_intermediate_version() {
    let dev = VolatileDevice::zeroed(SECTOR_SIZE);
    for v in 1..=3u8 {
        dev.write_at(&[v; S], 0).unwrap();
    }
    let report = dev.power_cut_with(|_, n| n - 1).unwrap();
    assert_eq!(report.sectors, vec![(0, Fate::Version { index: 1, of: 3 })]);
    assert_eq!(report.kept_older(), 1);
    assert_eq!(read(&dev, 0, S), vec![2; S]);
}

#[test]
fn power_cut_is_deterministic_per_seed() {
    let run = |seed| {
        let dev = VolatileDevice::zeroed(128 * SECTOR_SIZE);
        for i in 0..128u64 {
            dev.write_at(&[i as u8 + 1; S], i * SECTOR_SIZE).unwrap();
            dev.write_at(&[i as u8 + 100; S], i * SECTOR_SIZE).unwrap();
        }
        let report = dev.power_cut(seed).unwrap();
        (report, dev.durable_snapshot().unwrap())
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).1, run(8).1);
}

#[test]
fn zero_range_is_a_write_of_zero_sectors() {
    let dev = VolatileDevice::zeroed(4 * SECTOR_SIZE);
    dev.write_at(&[5; 4 * S], 0).unwrap();
    dev.sync().unwrap();
    dev.zero_range(SECTOR_SIZE, 2 * SECTOR_SIZE).unwrap();
    assert_eq!(read(&dev, 0, 4 * S)[S..3 * S], vec![0; 2 * S]);
    // Lost on a power cut that keeps nothing.
    dev.power_cut_with(|_, _| 0).unwrap();
    assert_eq!(read(&dev, 0, 4 * S), vec![5; 4 * S]);
    assert_eq!(dev.stats().zero_ranges, 1);
}

#[test]
fn partial_sector_writes_modify_the_whole_sector() {
    let dev = VolatileDevice::zeroed(2 * SECTOR_SIZE);
    dev.write_at(&[1; 2 * S], 0).unwrap();
    dev.sync().unwrap();
    dev.write_at(&[2; 10], 500).unwrap();
    let mut want = vec![1; 2 * S];
    want[500..510].fill(2);
    assert_eq!(read(&dev, 0, 2 * S), want);
    dev.power_cut_with(|_, n| n).unwrap();
    assert_eq!(dev.durable_snapshot().unwrap(), want);
}

#[test]
fn fuse_marks_the_instant_of_failure_across_devices() {
    let fuse = Arc::new(Fuse::new());
    let a = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
    let b = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
    fuse.arm(2);
    a.write_at(&[1; S], 0).unwrap();
    b.sync().unwrap();
    // Both allowed calls used: the power is off from here on.
    assert!(fuse.tripped());
    a.write_at(&[2; S], SECTOR_SIZE).unwrap();
    b.write_at(&[3; S], 0).unwrap();
    b.sync().unwrap();
    // The running code still sees a consistent device...
    assert_eq!(read(&a, 0, 2 * S), [vec![1; S], vec![2; S]].concat());
    assert_eq!(read(&b, 0, S), vec![3; S]);
    assert_eq!(a.stats().after_cut + b.stats().after_cut, 3);
    // ...but a power cut starts from the instant of the failure, even
    // when it keeps every cached write and the later sync "happened".
    a.power_cut_with(|_, n| n).unwrap();
    b.power_cut_with(|_, n| n).unwrap();
    assert_eq!(read(&a, 0, 2 * S), [vec![1; S], vec![0; S]].concat());
    assert_eq!(read(&b, 0, S), vec![0; S]);
    // The dead process may still be running: what it does after the
    // cut does not reach the snapshot of the survivors.
    a.write_at(&[5; S], 0).unwrap();
    a.sync().unwrap();
    assert_eq!(
        a.durable_snapshot().unwrap(),
        [vec![1; S], vec![0; 3 * S]].concat()
    );
    fuse.disarm();
    b.write_at(&[4; S], 0).unwrap();
    assert_eq!(read(&b, 0, S), vec![4; S]);
    b.power_cut_with(|_, n| n).unwrap();
    assert_eq!(read(&b, 0, S), vec![4; S]);
}

#[test]
fn corruption_reaches_durable_and_cached_versions() {
    let dev = VolatileDevice::zeroed(2 * SECTOR_SIZE);
    dev.write_at(&[1; S], 0).unwrap();
    dev.sync().unwrap();
    dev.write_at(&[2; S], 0).unwrap();
    dev.corrupt_flip_bit(3, 0).unwrap();
    let mut want = vec![2; S];
    want[3] ^= 1;
    assert_eq!(read(&dev, 0, S), want);
    dev.power_cut_with(|_, _| 0).unwrap();
    let mut want = vec![1; S];
    want[3] ^= 1;
    assert_eq!(read(&dev, 0, S), want);

    dev.write_at(&[6; S], SECTOR_SIZE).unwrap();
    dev.corrupt_write(SECTOR_SIZE + 4, &[8; 4]).unwrap();
    assert_eq!(read(&dev, SECTOR_SIZE + 2, 4), vec![6, 6, 8, 8]);
    dev.power_cut_with(|_, _| 0).unwrap();
    assert_eq!(read(&dev, SECTOR_SIZE + 2, 4), vec![0, 0, 8, 8]);
}

#[test]
fn cache_limit_destages_and_writes_large_requests_through() {
    let dev = VolatileDevice::zeroed(16 * SECTOR_SIZE).with_cache_limit(4);
    dev.write_at(&[1; 3 * S], 0).unwrap();
    dev.write_at(&[2; 2 * S], 8 * SECTOR_SIZE).unwrap(); // forces a destage
    assert_eq!(dev.stats().destages, 1);
    assert_eq!(dev.cached_sectors(), 2);
    dev.write_at(&[3; S], 8 * SECTOR_SIZE).unwrap();
    dev.write_at(&[4; 8 * S], 8 * SECTOR_SIZE).unwrap(); // through
    assert_eq!(dev.cached_sectors(), 0);
    dev.power_cut_with(|_, _| 0).unwrap();
    assert_eq!(read(&dev, 0, 3 * S), vec![1; 3 * S]);
    assert_eq!(read(&dev, 8 * SECTOR_SIZE, 8 * S), vec![4; 8 * S]);
}

#[test]
fn a_larger_atomic_unit_is_kept_or_lost_whole() {
    const U: usize = 4096;
    let dev = VolatileDevice::zeroed(64 * U as u64)
        .with_atomic_unit(U as u64)
        .unwrap();
    for b in 0..64u64 {
        dev.write_at(&[b as u8 + 1; U], b * U as u64).unwrap();
    }
    // A partial write is a read-modify-write of its unit.
    dev.write_at(&[0xaa; 10], 5 * U as u64 + 100).unwrap();
    let report = dev.power_cut(3).unwrap();
    assert_eq!(report.sectors.len(), 64, "one fate per 4096-byte unit");
    assert!(report.kept() > 0 && report.reverted() > 0);
    let durable = dev.durable_snapshot().unwrap();
    for (b, chunk) in durable.chunks(U).enumerate() {
        let first = chunk[0];
        let torn = chunk.iter().enumerate().any(|(i, &x)| {
            let patched = b == 5 && (100..110).contains(&i) && x == 0xaa;
            x != first && !patched
        });
        assert!(!torn, "unit {b} was torn");
    }
    assert!(VolatileDevice::zeroed(3 * 512)
        .with_atomic_unit(1024)
        .is_err());
    assert!(VolatileDevice::zeroed(4096).with_atomic_unit(3000).is_err());
}

#[test]
fn a_switched_off_supply_refuses_everything_until_devices_are_rebuilt() {
    let supply = Arc::new(PowerSupply::new());
    let inner: Arc<dyn Device> = Arc::new(MemDevice::new(8 * SECTOR_SIZE));
    let dev = VolatileDevice::new(inner.clone()).with_power_supply(supply.clone());
    dev.write_at(&[1; S], 0).unwrap();
    dev.sync().unwrap();
    dev.write_at(&[2; S], SECTOR_SIZE).unwrap();
    supply.switch_off();
    assert!(dev.write_at(&[3; S], 0).is_err());
    assert!(dev.zero_range(0, SECTOR_SIZE).is_err());
    assert!(dev.sync().is_err());
    assert!(dev.read_at(&mut [0; S], 0).is_err());
    // The cut still drops the cache into the durable store.
    let report = dev.power_cut_with(|_, n| n).unwrap();
    assert_eq!(report.kept(), 1);
    assert!(dev.write_at(&[4; S], 0).is_err(), "still without power");
    let fresh = VolatileDevice::new(inner);
    assert_eq!(read(&fresh, 0, 2 * S), [vec![1; S], vec![2; S]].concat());
}

#[test]
fn destaged_zeros_stay_zeros_and_next_data_sees_cached_units() {
    let dev = VolatileDevice::zeroed(16 * SECTOR_SIZE);
    // MemDevice reports everything as data; that is the upper bound.
    dev.write_at(&[5; 16 * S], 0).unwrap();
    dev.sync().unwrap();
    dev.zero_range(2 * SECTOR_SIZE, 4 * SECTOR_SIZE).unwrap();
    dev.write_at(&[6; S], 6 * SECTOR_SIZE).unwrap();
    dev.sync().unwrap();
    let durable = dev.durable_snapshot().unwrap();
    assert_eq!(&durable[2 * S..6 * S], &vec![0; 4 * S][..]);
    assert_eq!(&durable[6 * S..7 * S], &vec![6; S][..]);

    // A sparse-looking inner device: no data anywhere.
    struct Holes(MemDevice);
    impl Device for Holes {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.zero_range(offset, len)
        }
        fn next_data(&self, _: u64) -> io::Result<Option<(u64, u64)>> {
            Ok(None)
        }
    }
    let dev = VolatileDevice::new(Arc::new(Holes(MemDevice::new(8 * SECTOR_SIZE))));
    assert_eq!(dev.next_data(0).unwrap(), None);
    dev.write_at(&[1; 10], 3 * SECTOR_SIZE + 7).unwrap();
    assert_eq!(
        dev.next_data(SECTOR_SIZE).unwrap(),
        Some((3 * SECTOR_SIZE, 4 * SECTOR_SIZE))
    );
    assert_eq!(
        dev.next_data(3 * SECTOR_SIZE + 9).unwrap(),
        Some((3 * SECTOR_SIZE + 9, 4 * SECTOR_SIZE))
    );
    assert_eq!(dev.next_data(4 * SECTOR_SIZE).unwrap(), None);
}

#[test]
fn out_of_range_is_an_error() {
    let dev = VolatileDevice::zeroed(SECTOR_SIZE);
    assert!(dev.write_at(&[0; 2], SECTOR_SIZE - 1).is_err());
    assert!(dev.read_at(&mut [0; 1], SECTOR_SIZE).is_err());
    assert!(dev.zero_range(1, SECTOR_SIZE).is_err());
    assert!(dev.corrupt_flip_bit(SECTOR_SIZE, 0).is_err());
}
