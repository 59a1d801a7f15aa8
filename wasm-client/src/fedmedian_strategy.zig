//! FedMedian as a strategy module (strategy contract v1, ../README.md): the coordinate-wise
//! median of the updates, unweighted, as the aggregator's built-in FedMedian
//! (server/aggregator/strategies/robust.py, numpy's median): for an even K the mean of the
//! two middle values, (a + b) / 2 in f64. Every update is held (raw, as read) until the
//! medians are taken.

const std = @import("std");
const st = @import("strategy.zig");

/// The marker the aggregator looks for among the module's exports.
export fn propeller_strategy_v1() void {}

pub fn main(init: std.process.Init) !void {
    const alloc = init.arena.allocator();
    var in_buf: [1 << 16]u8 = undefined;
    var fr = std.Io.File.stdin().readerStreaming(init.io, &in_buf);
    var in = try st.readInput(alloc, &fr.interface);

    in.skip(in.weights); // unweighted: a Byzantine client can claim any sample count
    for (in.base) |b| in.skip(b);
    const held = try alloc.alloc([]u8, in.k * in.names.len);
    for (0..in.k) |i| {
        for (0..in.names.len) |j| held[i * in.names.len + j] = try in.raw(alloc, in.update(i, j));
    }
    const column = try alloc.alloc(f64, in.k);
    const medians = try alloc.alloc([]f64, in.names.len);
    for (medians, in.base, 0..) |*m, b, j| {
        m.* = try alloc.alloc(f64, b.count);
        for (m.*, 0..) |*v, c| {
            for (column, 0..) |*x, i| x.* = st.element(held[i * in.names.len + j], in.update(i, j).dtype, c);
            std.mem.sort(f64, column, {}, std.sort.asc(f64));
            const mid = in.k / 2;
            v.* = if (in.k % 2 == 1) column[mid] else (column[mid - 1] + column[mid]) / 2.0;
        }
    }
    const weights = try alloc.alloc(f64, in.k);
    @memset(weights, 1.0 / @as(f64, @floatFromInt(in.k)));

    var out_buf: [1 << 16]u8 = undefined;
    var fw = std.Io.File.stdout().writerStreaming(init.io, &out_buf);
    try st.writeOutput(alloc, &fw.interface, in, medians, weights);
    try fw.interface.flush();
}
