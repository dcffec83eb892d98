// meshrt.tracking — who hears about every allocation and free.
//
// The runtime reports each per-device buffer's life to a Tracker as AllocationEvents, in
// batches. Processors observe them (a live table, the client that streams to the allocation
// server, a test's log); hooks may intercept an allocation before it takes memory.
export module meshrt.tracking;

export import :events;
export import :client;
