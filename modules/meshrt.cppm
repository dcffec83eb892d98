// meshrt — everything an application needs, in one import.
export module meshrt;

export import meshrt.core;
export import meshrt.alloc;
export import meshrt.tracking;
export import meshrt.tracking_client;
export import meshrt.device;
export import meshrt.mesh;
export import meshrt.program;
export import meshrt.tensor;
export import meshrt.ops;
