//! The trainers' reproducible shuffle (main.zig, the linear trainer; mlp.zig, the MLP): one
//! home, so both visit the samples in the same order for the same round, proplet and epoch
//! (wasm-client/README.md, "Training").

const std = @import("std");

const fnv_offset: u64 = 0xcbf29ce484222325;
const fnv_prime: u64 = 0x100000001b3;

fn fnv1a(h0: u64, bytes: []const u8) u64 {
    var h = h0;
    for (bytes) |c| {
        h ^= c;
        h *%= fnv_prime;
    }
    return h;
}

/// FNV-1a 64 of ROUND_ID ++ 0x00 ++ PROPLET_ID ++ 0x00 ++ epoch (u64 LE).
pub fn epochSeed(round_id: []const u8, proplet_id: []const u8, epoch: u64) u64 {
    var h = fnv1a(fnv_offset, round_id);
    h = fnv1a(h, &.{0});
    h = fnv1a(h, proplet_id);
    h = fnv1a(h, &.{0});
    var le: [8]u8 = undefined;
    std.mem.writeInt(u64, &le, epoch, .little);
    return fnv1a(h, &le);
}

/// Resets `order` to 0..n-1 and applies Fisher-Yates with SplitMix64:
/// for i = n-1 down to 1: j = next() % (i + 1); swap(order[i], order[j]).
pub fn shuffle(order: []usize, seed: u64) void {
    for (order, 0..) |*o, i| o.* = i;
    if (order.len < 2) return;
    var rng = std.Random.SplitMix64.init(seed);
    var i: usize = order.len - 1;
    while (i > 0) : (i -= 1) {
        const j: usize = @intCast(rng.next() % @as(u64, i + 1));
        std.mem.swap(usize, &order[i], &order[j]);
    }
}
