// meshrt.tracking — who hears about every allocation and free: the observer API.
//
// The runtime reports each per-device buffer's life to a Tracker as AllocationEvents, in
// batches. Processors observe them (a live table, a test's log, and the client that streams to
// the allocation server, which is meshrt.tracking_client's); hooks may intercept an allocation
// before it takes memory. Nothing here knows sockets or the wire protocol.
export module meshrt.tracking;

export import :events;
