//! The ETW sessions that watch one process (Windows only; type-checked on Linux with
//! `cargo xtask check-targets`, never run there). A kernel session brings thread,
//! VirtualAlloc/VirtualFree and handle events; a user session brings the heap provider's events
//! with their stacks, for the target's pid. Each event is decoded by [`crate::records`] and handed
//! to the caller with its thread, time and stack.

use std::mem::{size_of, size_of_val};
use std::sync::Arc;

use ferrisetw::native::EvntraceNativeError;
use ferrisetw::provider::kernel_providers::{self, KernelProvider};
use ferrisetw::provider::{EventFilter, Provider as EtwProvider, TraceFlags};
use ferrisetw::trace::{KernelTrace, TraceError, UserTrace};
use ferrisetw::{EventRecord, SchemaLocator, GUID};
use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
use windows_sys::Win32::Security::{GetTokenInformation, TokenElevation, TOKEN_ELEVATION, TOKEN_QUERY};
use windows_sys::Win32::System::Diagnostics::Etw::{
    ControlTraceW, QueryAllTracesW, TraceQueryInformation, TraceSetInformation, TraceStackTracingInfo,
    TraceSystemTraceEnableFlagsInfo, CLASSIC_EVENT_ID, CONTROLTRACE_HANDLE, EVENT_RECORD, EVENT_TRACE_CONTROL,
    EVENT_TRACE_CONTROL_FLUSH, EVENT_TRACE_CONTROL_QUERY, EVENT_TRACE_CONTROL_STOP, EVENT_TRACE_PROPERTIES,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use crate::names::{owner_of, session_name};
use crate::records::{decode, Provider, Record};

/// `EVENT_HEADER_FLAG_32_BIT_HEADER`: the event was logged by a 32-bit process.
const HEADER_32_BIT: u16 = 0x0020;

/// One decoded event of the target, or of this process's own threads (see [`Sessions::start`]).
#[derive(Debug, Clone)]
pub struct Observed {
    pub pid: u32,
    pub record: Record,
    /// The event's FILETIME-based timestamp (100 ns units).
    pub timestamp: i64,
    pub tid: u32,
    /// Return addresses, innermost first, when the provider logged a stack.
    pub stack: Vec<u64>,
}

/// The Object manager's events, routed to our callback; they flow once the session's group
/// mask asks for them (see [`enable_handle_events`]), not through classic enable flags.
static OBJECT_MANAGER: KernelProvider = KernelProvider::new(GUID::from_u128(Provider::Object.guid()), 0);

/// The kernel events logged with their stack: VirtualAlloc, handle creation, thread start
/// (the events that end a resource need none).
const STACKED_EVENTS: [(Provider, u8); 3] = [(Provider::PageFault, 98), (Provider::Object, 32), (Provider::Thread, 1)];

/// `PERF_OB_HANDLE` (0x80000040) in PERFINFO_GROUPMASK: word 4, bit 0x40.
const OB_HANDLE_MASK: (usize, u32) = (4, 0x40);

/// The running sessions; dropping them stops them.
pub struct Sessions {
    _kernel: KernelTrace,
    heap: Option<UserTrace>,
    names: Vec<String>,
    handles: bool,
    /// What the sessions could not be given, and why: handle events, the kernel events' stacks.
    pub missing: Vec<String>,
}

/// Why the sessions could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The kernel session needs an administrator (or the Performance Log Users group).
    Kernel(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kernel(why) => {
                write!(f, "cannot start the ETW kernel session ({why}): it needs an administrator")
            }
        }
    }
}

impl std::error::Error for StartError {}

impl Sessions {
    /// Starts watching `pid`. Heap events only come if the process opted in to heap tracing
    /// before it started; without them the caller keeps polling the heaps (`heap` is then None).
    /// The thread events of this process come too: a thread it starts and ends after a
    /// [`Sessions::flush`] marks the point up to which the kernel session has delivered.
    pub fn start(pid: u32, sink: impl Fn(Observed) + Send + Sync + 'static) -> Result<Self, StartError> {
        let sink = Arc::new(sink);
        let own = std::process::id();
        let callback = |sink: Arc<dyn Fn(Observed) + Send + Sync>| {
            move |record: &EventRecord, _: &SchemaLocator| {
                let from = record.process_id();
                if from == pid || (from == own && record.provider_id() == kernel_providers::THREAD_PROVIDER.guid) {
                    if let Some(observed) = observe(record) {
                        sink(observed);
                    }
                }
            }
        };
        let kernel_name = session_name(own, "kernel", pid);
        let kernel = KernelTrace::new()
            .named(kernel_name.clone())
            .enable(EtwProvider::kernel(&OBJECT_MANAGER).add_callback(callback(sink.clone())).build())
            .enable(
                EtwProvider::kernel(&kernel_providers::THREAD_PROVIDER).add_callback(callback(sink.clone())).build(),
            )
            .enable(
                EtwProvider::kernel(&kernel_providers::VIRTUAL_ALLOC_PROVIDER)
                    .add_callback(callback(sink.clone()))
                    .build(),
            )
            .start_and_process()
            .map_err(|e| StartError::Kernel(describe(e)))?;
        let mut heap = EtwProvider::by_guid(GUID::from_u128(Provider::Heap.guid()))
            .trace_flags(TraceFlags::EVENT_ENABLE_PROPERTY_STACK_TRACE)
            .add_callback(callback(sink));
        // ETW's pid filter takes 16-bit pids; a larger one is filtered in the callback only.
        if let Ok(pid) = u16::try_from(pid) {
            heap = heap.add_filter(EventFilter::ByPids(vec![pid]));
        }
        let heap_name = session_name(own, "heap", pid);
        let heap = UserTrace::new().named(heap_name.clone()).enable(heap.build()).start_and_process().ok();
        let mut missing = Vec::new();
        let handles = match session_handle(&kernel_name).and_then(enable_handle_events) {
            Ok(()) => true,
            Err(why) => {
                missing.push(format!("no handle events: {why}"));
                false
            }
        };
        if let Err(why) = session_handle(&kernel_name).and_then(enable_kernel_stacks) {
            missing.push(format!("no stacks for VirtualAlloc, handle and thread events: {why}"));
        }
        let names = [Some(kernel_name), heap.is_some().then_some(heap_name)].into_iter().flatten().collect();
        Ok(Self { _kernel: kernel, heap, names, handles, missing })
    }

    /// How many providers deliver events: thread, VirtualAlloc, handles, heap.
    pub fn providers(&self) -> usize {
        2 + usize::from(self.handles) + usize::from(self.heap.is_some())
    }

    /// Asks each session to deliver the events it holds in its buffers (real-time sessions
    /// otherwise deliver a buffer when it fills, or every second).
    pub fn flush(&self) -> Result<(), String> {
        for name in &self.names {
            let mut query = Query::new();
            // SAFETY: `query` is sized as its BufferSize says, with the name offsets inside it.
            let rc = unsafe { control(name, &mut query, EVENT_TRACE_CONTROL_FLUSH) };
            if rc != 0 {
                return Err(format!("cannot flush the session {name} (error {rc})"));
            }
        }
        Ok(())
    }
}

/// Whether this process runs elevated (as an administrator), which the kernel session needs.
pub fn is_elevated() -> bool {
    let mut token: HANDLE = std::ptr::null_mut();
    let mut elevation = TOKEN_ELEVATION { TokenIsElevated: 0 };
    let mut len = 0;
    // SAFETY: the token handle is ours and closed below; the query writes one TOKEN_ELEVATION.
    unsafe {
        if OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) == 0 {
            return false;
        }
        let size = size_of::<TOKEN_ELEVATION>() as u32;
        let ok = GetTokenInformation(token, TokenElevation, (&raw mut elevation).cast(), size, &mut len);
        CloseHandle(token);
        ok != 0 && elevation.TokenIsElevated != 0
    }
}

/// EVENT_TRACE_PROPERTIES followed by room for the logger and log file names, as ControlTrace
/// wants them.
#[repr(C)]
struct Query {
    properties: EVENT_TRACE_PROPERTIES,
    names: [u16; 2 * LOGGER_NAME_UNITS],
}

/// Room for a session's name, then as much for its log file's, in UTF-16 units.
const LOGGER_NAME_UNITS: usize = 1024;

impl Query {
    fn new() -> Box<Self> {
        let mut query =
            Box::new(Self { properties: EVENT_TRACE_PROPERTIES::default(), names: [0; 2 * LOGGER_NAME_UNITS] });
        query.properties.Wnode.BufferSize = size_of::<Self>() as u32;
        query.properties.LoggerNameOffset = size_of::<EVENT_TRACE_PROPERTIES>() as u32;
        query.properties.LogFileNameOffset = (size_of::<EVENT_TRACE_PROPERTIES>() + 2 * LOGGER_NAME_UNITS) as u32;
        query
    }
}

/// ControlTraceW on the session called `name`.
///
/// # Safety
/// `query` must come from [`Query::new`].
unsafe fn control(name: &str, query: &mut Query, code: EVENT_TRACE_CONTROL) -> u32 {
    let wide: Vec<u16> = name.encode_utf16().chain([0]).collect();
    ControlTraceW(CONTROLTRACE_HANDLE { Value: 0 }, wide.as_ptr(), &mut query.properties, code)
}

/// ferrisetw's error in words (it has no Display).
fn describe(error: TraceError) -> String {
    match error {
        TraceError::InvalidTraceName => "invalid session name".into(),
        TraceError::EtwNativeError(EvntraceNativeError::InvalidHandle) => "invalid handle".into(),
        TraceError::EtwNativeError(EvntraceNativeError::AlreadyExist) => "a session of that name exists".into(),
        TraceError::EtwNativeError(EvntraceNativeError::IoError(e)) => e.to_string(),
    }
}

/// The control handle of the running session `name`. ferrisetw keeps its own to itself, so the
/// session is found again by name (a query returns its handle in `Wnode.HistoricalContext`).
fn session_handle(name: &str) -> Result<CONTROLTRACE_HANDLE, String> {
    let mut query = Query::new();
    // SAFETY: `query` comes from Query::new.
    let rc = unsafe { control(name, &mut query, EVENT_TRACE_CONTROL_QUERY) };
    if rc != 0 {
        return Err(format!("cannot find the session {name} (error {rc})"));
    }
    // SAFETY: a successful query filled the union's context member.
    Ok(CONTROLTRACE_HANDLE { Value: unsafe { query.properties.Wnode.Anonymous1.HistoricalContext } })
}

/// Adds the handle events to the running kernel session: its group mask gains PERF_OB_HANDLE.
fn enable_handle_events(session: CONTROLTRACE_HANDLE) -> Result<(), String> {
    let mut masks = [0u32; 8];
    let size = size_of_val(&masks) as u32;
    let mut len = 0;
    // SAFETY: the group mask calls read and write the 8 words of `masks`.
    unsafe {
        let rc =
            TraceQueryInformation(session, TraceSystemTraceEnableFlagsInfo, masks.as_mut_ptr().cast(), size, &mut len);
        if rc != 0 {
            return Err(format!("cannot read the session's group mask (error {rc})"));
        }
        masks[OB_HANDLE_MASK.0] |= OB_HANDLE_MASK.1;
        let rc = TraceSetInformation(session, TraceSystemTraceEnableFlagsInfo, masks.as_ptr().cast(), size);
        if rc != 0 {
            return Err(format!("cannot set the session's group mask (error {rc})"));
        }
    }
    Ok(())
}

/// Has the kernel session log a stack with each of [`STACKED_EVENTS`].
fn enable_kernel_stacks(session: CONTROLTRACE_HANDLE) -> Result<(), String> {
    let events = STACKED_EVENTS.map(|(provider, opcode)| CLASSIC_EVENT_ID {
        EventGuid: windows_sys::core::GUID::from_u128(provider.guid()),
        Type: opcode,
        Reserved: [0; 7],
    });
    // SAFETY: reads the array of CLASSIC_EVENT_IDs, sized as said.
    let rc = unsafe {
        TraceSetInformation(session, TraceStackTracingInfo, events.as_ptr().cast(), size_of_val(&events) as u32)
    };
    if rc != 0 {
        return Err(format!("TraceSetInformation failed (error {rc})"));
    }
    Ok(())
}

/// Stops the psleak sessions whose owner is no longer `running` (a psleak that was killed:
/// ETW sessions outlive their process). Returns their names.
pub fn stop_orphans(running: impl Fn(u32) -> bool) -> Vec<String> {
    const MAX_SESSIONS: usize = 64;
    let mut queries: Vec<Box<Query>> = (0..MAX_SESSIONS).map(|_| Query::new()).collect();
    let mut pointers: Vec<*mut EVENT_TRACE_PROPERTIES> = queries.iter_mut().map(|q| &raw mut q.properties).collect();
    let mut count = 0;
    // SAFETY: MAX_SESSIONS pointers, each to a Query sized as its BufferSize says.
    if unsafe { QueryAllTracesW(pointers.as_mut_ptr(), MAX_SESSIONS as u32, &mut count) } != 0 {
        return Vec::new();
    }
    let mut stopped = Vec::new();
    for query in queries.iter().take(count as usize) {
        let logger = &query.names[..LOGGER_NAME_UNITS];
        let name = String::from_utf16_lossy(&logger[..logger.iter().position(|&c| c == 0).unwrap_or(logger.len())]);
        if owner_of(&name).is_some_and(|owner| !running(owner)) {
            let mut stop = Query::new();
            // SAFETY: `stop` comes from Query::new.
            if unsafe { control(&name, &mut stop, EVENT_TRACE_CONTROL_STOP) } == 0 {
                stopped.push(name);
            }
        }
    }
    stopped
}

/// The decoded event, or None for what psleak does not follow or cannot read.
fn observe(record: &EventRecord) -> Option<Observed> {
    let provider = Provider::of_guid_value(record.provider_id().to_u128())?;
    let pointer_size = if record.event_flags() & HEADER_32_BIT != 0 { 4 } else { 8 };
    let decoded = decode(provider, record.opcode(), pointer_size, user_data(record)).ok()??;
    let stack = record
        .extended_data()
        .iter()
        .find_map(|item| match item.to_extended_data_item() {
            ferrisetw::native::ExtendedDataItem::StackTrace64(trace) => Some(trace.addresses().to_vec()),
            ferrisetw::native::ExtendedDataItem::StackTrace32(trace) => {
                Some(trace.addresses().iter().map(|&a| u64::from(a)).collect())
            }
            _ => None,
        })
        .unwrap_or_default();
    let (pid, timestamp, tid) = (record.process_id(), record.raw_timestamp(), record.thread_id());
    Some(Observed { pid, record: decoded, timestamp, tid, stack })
}

/// The event's payload. ferrisetw's `EventRecord` is a transparent wrapper over
/// `EVENT_RECORD` but keeps the payload to its schema-based parser; psleak decodes the
/// documented layouts itself, in code that is tested on every platform.
fn user_data(record: &EventRecord) -> &[u8] {
    let raw = record as *const EventRecord as *const EVENT_RECORD;
    // SAFETY: EventRecord is #[repr(transparent)] over EVENT_RECORD, and ETW guarantees
    // UserData points to UserDataLength bytes for the duration of the callback.
    unsafe {
        let raw = &*raw;
        if raw.UserData.is_null() {
            return &[];
        }
        std::slice::from_raw_parts(raw.UserData as *const u8, usize::from(raw.UserDataLength))
    }
}
