// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * safeusb's in-kernel scan: BPF iterators that walk every process's working and root
 * directory (iter/task), open files (iter/task_file) and file-backed mappings
 * (iter/task_vma; on Linux >= 6.7, iter/task with the open-coded mapping iterator, in two
 * halves read side by side) in the kernel, and write out only those on the device being
 * inspected:
 * files whose filesystem (s_dev) or device node (i_rdev) is in the devs map, which
 * safeusb/host/bpfscan.py fills before it reads the iterators.
 *
 * Only thread group leaders are reported: /proc/PID/fd, cwd, root and maps, which the
 * /proc scan reads, are the leader's. Files on filesystems whose stat() may report
 * another device than the superblock's (overlayfs, btrfs) are written out with
 * REC_STAT so that user space stats them as the /proc scan does. Records are fixed-size
 * (struct scan_rec, mirrored in safeusb/host/bpfscan.py); names are read by user space for the
 * few that match. Fields are read directly (BTF pointers, CO-RE relocated through
 * vmlinux.h's preserve_access_index): the map program runs once per mapping of every
 * process, and a probe-read helper call per field costs more than the rest of it.
 */
/* A vmlinux.h of Linux >= 6.7 has the open-coded iterator's struct; older ones do not.
 * Its name is moved aside here and the struct declared below, the same either way. */
#define bpf_iter_task_vma safeusb_vmlinux_bpf_iter_task_vma
#include "vmlinux.h"
#undef bpf_iter_task_vma
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

/* The open-coded mapping iterator (kfuncs of Linux >= 6.7). On older kernels the object
 * is loaded again without the programs that call them (bpfscan.py), and scan_maps walks
 * the mappings instead. */
struct bpf_iter_task_vma {
	__u64 __opaque[1];
} __attribute__((aligned(8)));
extern int bpf_iter_task_vma_new(struct bpf_iter_task_vma *it, struct task_struct *task,
				 __u64 addr) __weak __ksym;
extern struct vm_area_struct *bpf_iter_task_vma_next(struct bpf_iter_task_vma *it) __weak __ksym;
extern void bpf_iter_task_vma_destroy(struct bpf_iter_task_vma *it) __weak __ksym;

#define S_IFMT 00170000
#define S_IFBLK 0060000
#define S_IFCHR 0020000

#define OVERLAYFS_SUPER_MAGIC 0x794c7630
#define BTRFS_SUPER_MAGIC 0x9123683e

/* Bits of a devs map value: what the device number is to the inspected device. */
#define DEV_FS 1	/* a filesystem on it (s_dev) */
#define DEV_BLOCK 2	/* one of its block nodes (i_rdev) */
#define DEV_CHAR 4	/* one of its character nodes (i_rdev) */

enum rec_kind {
	REC_FD = 1,
	REC_CWD = 2,
	REC_ROOT = 3,
	REC_MMAP = 4,
	REC_MNTNS = 5,	/* every leader's mount namespace: ino is its inode number */
	REC_MAPS_UNREAD = 6,	/* a leader whose mappings were not walked (its mm was busy) */
};

#define REC_STAT 1	/* flags: user space must stat it (st_dev may differ from s_dev) */

struct scan_rec {
	__u32 kind;
	__u32 tgid;
	__s32 fd;	/* -1 but for REC_FD */
	__u32 mode;
	__u32 dev;	/* s_dev, the kernel's encoding (major << 20 | minor) */
	__u32 rdev;	/* i_rdev */
	__u32 flags;
	__u32 pad;
	__u64 ino;
	__u64 start;	/* REC_MMAP: the mapping's start address */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} devs SEC(".maps");

static __always_inline __u32 bits(__u32 dev)
{
	__u32 *v = bpf_map_lookup_elem(&devs, &dev);

	return v ? *v : 0;
}

static __always_inline int special(struct super_block *sb)
{
	unsigned long magic = sb->s_magic;

	return magic == OVERLAYFS_SUPER_MAGIC || magic == BTRFS_SUPER_MAGIC;
}

static __always_inline void emit(struct seq_file *seq, __u32 kind, __u32 tgid, __s32 fd,
				 struct inode *inode, __u64 start, __u32 flags)
{
	struct scan_rec r = {};

	r.kind = kind;
	r.tgid = tgid;
	r.fd = fd;
	r.mode = inode->i_mode;
	r.dev = inode->i_sb->s_dev;
	r.rdev = inode->i_rdev;
	r.ino = inode->i_ino;
	r.start = start;
	r.flags = flags;
	bpf_seq_write(seq, &r, sizeof(r));
}

/* An inode on the device: a file on one of its filesystems, or one of its nodes. */
static __always_inline int on_device(struct inode *inode)
{
	__u32 mode = inode->i_mode & S_IFMT;

	return (mode == S_IFBLK && (bits(inode->i_rdev) & DEV_BLOCK))
	    || (mode == S_IFCHR && (bits(inode->i_rdev) & DEV_CHAR))
	    || (bits(inode->i_sb->s_dev) & DEV_FS);
}

/* An inode found as a file, working or root directory: on the device, or to be stat()ed
 * from user space (REC_STAT) to tell. */
static __always_inline __u32 wanted(struct inode *inode)
{
	if (on_device(inode))
		return 1;
	if (special(inode->i_sb))
		return 1 | (REC_STAT << 8);
	return 0;
}

static __always_inline int leader(struct task_struct *task)
{
	return task->pid == task->tgid;
}

static __always_inline void dir(struct seq_file *seq, struct task_struct *task,
				struct dentry *dentry, __u32 kind)
{
	struct inode *inode = dentry ? dentry->d_inode : NULL;
	__u32 w;

	if (!inode)
		return;
	w = wanted(inode);
	if (w)
		emit(seq, kind, task->tgid, -1, inode, 0, w >> 8);
}

SEC("iter/task")
int scan_dirs(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct fs_struct *fs;

	if (!task || !leader(task))
		return 0;
	fs = task->fs;
	if (!fs)
		return 0;
	dir(ctx->meta->seq, task, fs->pwd.dentry, REC_CWD);
	dir(ctx->meta->seq, task, fs->root.dentry, REC_ROOT);
	return 0;
}

SEC("iter/task")
int scan_ns(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct nsproxy *nsp;
	struct scan_rec r = {};

	if (!task || !leader(task))
		return 0;
	nsp = task->nsproxy;
	if (!nsp || !nsp->mnt_ns)
		return 0;	/* exiting: /proc/PID/ns/mnt is gone too */
	r.kind = REC_MNTNS;
	r.tgid = task->tgid;
	r.fd = -1;
	r.ino = nsp->mnt_ns->ns.inum;
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

SEC("iter/task_file")
int scan_files(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct inode *inode;
	__u32 w;

	if (!task || !file || !leader(task))
		return 0;
	inode = file->f_inode;
	if (!inode)
		return 0;
	w = wanted(inode);
	if (w)
		emit(ctx->meta->seq, REC_FD, task->tgid, ctx->fd, inode, 0, w >> 8);
	return 0;
}

/* A mapping on the device: of a file on one of its filesystems (/proc/PID/maps prints
 * the device of file_inode(vm_file), as this reads it), or of one of its nodes, which
 * holds the device open on its own after its descriptor is closed (its mode and i_rdev
 * tell it). */
static __always_inline struct inode *mapped(struct vm_area_struct *vma)
{
	struct file *file = vma->vm_file;

	if (!file || !on_device(file->f_inode))
		return NULL;
	return file->f_inode;
}

SEC("iter/task_vma")
int scan_maps(struct bpf_iter__task_vma *ctx)
{
	struct task_struct *task = ctx->task;
	struct vm_area_struct *vma = ctx->vma;
	struct inode *inode;

	if (!task || !vma)
		return 0;
	inode = mapped(vma);
	if (!inode || !leader(task))
		return 0;
	emit(ctx->meta->seq, REC_MMAP, task->tgid, -1, inode, vma->vm_start, 0);
	return 0;
}

/* What a process maps, kept from one scan to the next (the open-coded walk only): a
 * process whose mappings have not changed since they were last walked, and which then
 * mapped nothing on the filesystems and nodes now looked for, is not walked again.
 *
 * Whether they changed is told by the mm's mm_lock_seq (Linux >= 6.4, CONFIG_PER_VMA_LOCK,
 * which x86 and arm64 select): every change to a process's mappings is made under its
 * mmap write lock, and the sequence moves on at every write unlock (an int up to 6.12; a
 * seqcount from 6.13, odd while a writer holds the lock). The kernel's own lock-free
 * readers (per-mapping locks, speculative lookups) rely on the same. A summary is kept
 * only for a walk during which the sequence stood, and used only for the same process
 * (pid, start time), the same program image (exec count: every exec brings a new mm) and
 * the same mm at the same sequence; anything else, and the process is walked. */
struct mm_struct___seqcount {
	seqcount_t mm_lock_seq;
} __attribute__((preserve_access_index));

struct mm_struct___int {
	int mm_lock_seq;
} __attribute__((preserve_access_index));

/* The sequence of the mm's write lock; 0 where the kernel has none, or a writer holds it
 * (a seqcount that is odd): then nothing is kept or trusted. */
static __always_inline int lock_seq(struct mm_struct *mm, __u32 *seq)
{
	if (bpf_core_field_exists(struct mm_struct___seqcount, mm_lock_seq)) {
		*seq = BPF_CORE_READ((struct mm_struct___seqcount *)mm, mm_lock_seq.sequence);
		return !(*seq & 1);
	}
	if (bpf_core_field_exists(struct mm_struct___int, mm_lock_seq)) {
		*seq = BPF_CORE_READ((struct mm_struct___int *)mm, mm_lock_seq);
		return 1;
	}
	return 0;
}

#define MAPS_BLOCK 1	/* the process maps a block device node */
#define MAPS_CHAR 2	/* ... a character device node */

struct mm_seen {
	__u64 mm;	/* the mm walked (its address, compared only) */
	__u64 start;	/* the process's start time */
	__u64 exec;	/* its exec count */
	__u64 fs;	/* the filesystems of its file mappings: bit (s_dev hash) set for each */
	__u32 seq;	/* mm_lock_seq during the walk */
	__u32 nodes;	/* MAPS_ bits */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, __u32);	/* tgid */
	__type(value, struct mm_seen);
} seen SEC(".maps");

/* What is looked for, in the summaries' terms; user space sets it with devs. */
struct want {
	__u64 fs;	/* the bits of the filesystems with DEV_FS */
	__u32 nodes;	/* MAPS_BLOCK where there are block nodes, MAPS_CHAR char nodes */
	__u32 set;	/* 1 once set: until then every process is walked */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct want);
} wants SEC(".maps");

/* The bit of a filesystem in a summary (bpfscan.py computes the same). */
static __always_inline __u64 fs_bit(__u32 dev)
{
	return 1ULL << ((__u32)(dev * 2654435761U) >> 26);
}

/* Whether the process's mappings, as last walked, are known to hold nothing looked for. */
static __always_inline int known_clear(struct task_struct *task, struct mm_struct *mm)
{
	__u32 tgid = task->tgid, zero = 0, seq;
	struct mm_seen *s = bpf_map_lookup_elem(&seen, &tgid);
	struct want *w;

	if (!s || !lock_seq(mm, &seq))
		return 0;
	if (s->seq != seq || s->mm != (__u64)mm || s->start != task->start_time
	    || s->exec != task->self_exec_id || task->mm != mm)
		return 0;
	w = bpf_map_lookup_elem(&wants, &zero);
	if (!w || w->set != 1)
		return 0;
	return !(s->fs & w->fs) && !(s->nodes & w->nodes);
}

/* The same, walked per process by the open-coded iterator: two programs, each for half of
 * the processes (by the parity of the pid), read side by side on two CPUs. The iterator
 * only tries the mm's lock; a process whose mappings it could not walk is written out as
 * REC_MAPS_UNREAD, and user space reads its /proc/PID/maps instead. */
static __always_inline int maps_of(struct bpf_iter__task *ctx, __u32 half)
{
	struct task_struct *task = ctx->task;
	struct bpf_iter_task_vma it;
	struct vm_area_struct *vma;
	struct mm_struct *mm;
	struct inode *inode;
	struct scan_rec r = {};
	struct mm_seen s = {};
	__u32 seq_before = 0, seq_after = 0;
	int err, keep;

	if (!task || !leader(task) || (task->tgid & 1) != half)
		return 0;
	mm = task->mm;
	if (!mm || known_clear(task, mm))
		return 0;
	keep = lock_seq(mm, &seq_before);
	err = bpf_iter_task_vma_new(&it, task, 0);
	while (!err && (vma = bpf_iter_task_vma_next(&it))) {
		struct file *file = vma->vm_file;
		__u32 mode;

		if (!file)
			continue;
		inode = file->f_inode;
		s.fs |= fs_bit(inode->i_sb->s_dev);
		mode = inode->i_mode & S_IFMT;
		if (mode == S_IFBLK)
			s.nodes |= MAPS_BLOCK;
		else if (mode == S_IFCHR)
			s.nodes |= MAPS_CHAR;
		if (on_device(inode))
			emit(ctx->meta->seq, REC_MMAP, task->tgid, -1, inode, vma->vm_start, 0);
	}
	bpf_iter_task_vma_destroy(&it);
	if (err && err != -2 /* ENOENT: no mm (any more) */) {
		r.kind = REC_MAPS_UNREAD;
		r.tgid = task->tgid;
		r.fd = -1;
		bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
		return 0;
	}
	/* Kept only when the walk was whole and nothing changed the mappings meanwhile. */
	if (!err && keep && lock_seq(mm, &seq_after) && seq_after == seq_before
	    && task->mm == mm) {
		__u32 tgid = task->tgid;

		s.mm = (__u64)mm;
		s.start = task->start_time;
		s.exec = task->self_exec_id;
		s.seq = seq_before;
		bpf_map_update_elem(&seen, &tgid, &s, BPF_ANY);
	}
	return 0;
}

SEC("iter/task")
int scan_maps_even(struct bpf_iter__task *ctx)
{
	return maps_of(ctx, 0);
}

SEC("iter/task")
int scan_maps_odd(struct bpf_iter__task *ctx)
{
	return maps_of(ctx, 1);
}

char LICENSE[] SEC("license") = "GPL";
