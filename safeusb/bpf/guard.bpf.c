// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * safeusb's kernel guard: a BPF LSM program that refuses, with EBUSY, to detach a
 * guarded driver (usb-storage, uas: the names are in the guarded_drivers map) from a USB
 * interface, whoever asks:
 *
 *   - usbfs ioctls on /dev/bus/usb/BBB/DDD (file_ioctl hook): USBDEVFS_DISCONNECT inside
 *     USBDEVFS_IOCTL (and its 32-bit form), and USBDEVFS_DISCONNECT_CLAIM; the interface
 *     is looked up as usbfs itself does (usb_ifnum_to_if);
 *   - sysfs writes (file_permission hook, MAY_WRITE): a guarded driver's
 *     /sys/bus/usb/drivers/DRIVER/unbind, and `authorized`, `remove` and
 *     `bConfigurationValue` of a USB device or interface that has a guarded driver bound.
 *
 * Deny by default: the program does not know whether the disks are in use; the service
 * (safeusbd) reads every refusal from the events ring buffer, inspects the device and,
 * when the policy lets it, prepares it (holds its disks, unbinds the driver) so that the
 * next attempt finds no guarded driver bound and passes.
 *
 * safeusb's own handover (prepare's unbind) is let through by an entry in the exempt
 * task storage, set from user space with a pidfd of the process: the entry lives on that
 * process's task_struct and dies with it, so it cannot be inherited by a later process
 * that gets the same pid.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define EBUSY 16
#define MAY_WRITE 0x2
#define SYSFS_MAGIC 0x62656572
#define USB_DEVICE_MAJOR 189
#define MINORBITS 20

#define USBDEVFS_IOCTL 0xc0105512U		/* _IOWR('U', 18, struct usbdevfs_ioctl) */
#define USBDEVFS_IOCTL32 0xc00c5512U		/* the same from a 32-bit process */
#define USBDEVFS_DISCONNECT 0x5516U		/* _IO('U', 22) */
#define USBDEVFS_CONNECT 0x5517U		/* _IO('U', 23) */
#define USBDEVFS_DISCONNECT_CLAIM 0x8108551bU	/* _IOR('U', 27, struct usbdevfs_disconnect_claim) */

#define S_IFMT 00170000
#define S_IFCHR 0020000
#define S_ISCHR(m) (((m) & S_IFMT) == S_IFCHR)

#define NAME_LEN 32
#define MAX_INTERFACES 32

/* What was tried; mirrored in safeusb/host/guard.py. */
enum guard_kind {
	KIND_IOCTL_DISCONNECT = 1,
	KIND_DISCONNECT_CLAIM = 2,
	KIND_SYSFS_UNBIND = 3,
	KIND_SYSFS_AUTHORIZED = 4,
	KIND_SYSFS_REMOVE = 5,
	KIND_SYSFS_CONFIGURATION = 6,
	KIND_SYSFS_BIND = 7,		/* a driver's bind while a device is handed over */
	KIND_SYSFS_NEW_ID = 8,		/* a driver's new_id (it binds what then matches) */
	KIND_SYSFS_PROBE = 9,		/* /sys/bus/usb/drivers_probe */
	KIND_IOCTL_CONNECT = 10,	/* usbfs USBDEVFS_CONNECT on a device handed over */
};

struct guard_event {
	__u64 device_id;	/* kernfs id of the USB device's sysfs directory (its inode) */
	__u32 pid;		/* thread group id */
	__u32 tid;
	__u32 uid;
	__u32 kind;
	__s32 ifnum;		/* interface number, -1 when not known */
	__u32 busnum;
	__u32 devnum;
	__u16 vendor;
	__u16 product;
	char comm[16];
	char port[NAME_LEN];	/* sysfs name of the device: 2-1 */
	char driver[NAME_LEN];
	char serial[64];
	char written[NAME_LEN];	/* for a driver's unbind file: what was written, if known */
	__u64 start_time;	/* the process's start (boot-time ns), to know it again */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, char[NAME_LEN]);
	__type(value, __u8);
} guarded_drivers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} exempt SEC(".maps");

/*
 * USB devices safeusb has handed over (prepare unbound usb-storage/uas): the kernfs id of
 * the device's sysfs directory (its inode number, never reused), filled by safeusb before
 * the unbind and emptied after the give-back.  While it holds any entry, nothing but
 * safeusb may bind usb-storage/uas (or the generic usb driver) or probe drivers.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u64);
} handed_over SEC(".maps");

/* [0] refusals, [1] exempted detaches, [2] events lost (ring buffer full) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &i);

	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline int streq(const char *a, const char *b, int n)
{
	for (int i = 0; i < n; i++) {
		if (a[i] != b[i])
			return 0;
		if (!a[i])
			return 1;
	}
	return 1;
}

static __always_inline int guarded_name(const char *kname, char out[NAME_LEN])
{
	__builtin_memset(out, 0, NAME_LEN);
	if (!kname || bpf_probe_read_kernel_str(out, NAME_LEN, kname) <= 0)
		return 0;
	return bpf_map_lookup_elem(&guarded_drivers, out) != NULL;
}

/* The guarded driver bound to an interface, into out; 0 when none is. */
static __always_inline int intf_guarded(struct usb_interface *intf, char out[NAME_LEN])
{
	struct device_driver *drv = BPF_CORE_READ(intf, dev.driver);

	if (!drv)
		return 0;
	return guarded_name(BPF_CORE_READ(drv, name), out);
}

static long found_one(struct bpf_map *map, const void *key, void *value, void *ctx)
{
	*(int *)ctx = 1;
	return 1;	/* stop at the first */
}

/* Is any device recorded as handed over? */
static __always_inline int any_handed_over(void)
{
	int found = 0;

	bpf_for_each_map_elem(&handed_over, found_one, &found, 0);
	return found;
}

static __always_inline int device_handed_over(struct usb_device *udev)
{
	__u64 id = BPF_CORE_READ(udev, dev.kobj.sd, id);

	return bpf_map_lookup_elem(&handed_over, &id) != NULL;
}

static __always_inline int is_exempt(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_struct *leader = task->group_leader;

	return bpf_task_storage_get(&exempt, leader, 0, 0) != NULL;
}

static __always_inline struct guard_event *new_event(__u32 kind)
{
	struct guard_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 id;

	if (!e) {
		count(2);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	id = bpf_get_current_pid_tgid();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->kind = kind;
	e->ifnum = -1;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->start_time = BPF_CORE_READ(bpf_get_current_task_btf(), group_leader, start_boottime);
	return e;
}

static __always_inline void fill_device(struct guard_event *e, struct usb_device *udev)
{
	const char *s;

	e->device_id = BPF_CORE_READ(udev, dev.kobj.sd, id);
	e->busnum = BPF_CORE_READ(udev, bus, busnum);
	e->devnum = BPF_CORE_READ(udev, devnum);
	e->vendor = BPF_CORE_READ(udev, descriptor.idVendor);
	e->product = BPF_CORE_READ(udev, descriptor.idProduct);
	s = BPF_CORE_READ(udev, dev.kobj.name);
	if (s)
		bpf_probe_read_kernel_str(e->port, sizeof(e->port), s);
	s = BPF_CORE_READ(udev, serial);
	if (s)
		bpf_probe_read_kernel_str(e->serial, sizeof(e->serial), s);
}

/*
 * Refuse (and report) or let through a detach of a guarded driver.  driver: its name;
 * udev: the device, or NULL when the kernel object does not say (a driver's unbind file).
 */
static __always_inline int refuse(__u32 kind, struct usb_device *udev, int ifnum,
				  const char driver[NAME_LEN], const char *written, __u32 wlen)
{
	struct guard_event *e;

	if (is_exempt()) {
		count(1);
		return 0;
	}
	count(0);
	e = new_event(kind);
	if (e) {
		if (udev)
			fill_device(e, udev);
		e->ifnum = ifnum;
		__builtin_memcpy(e->driver, driver, NAME_LEN);
		if (written && wlen) {
			__u64 n = wlen < NAME_LEN - 1 ? wlen : NAME_LEN - 1;

			/* keep the bound where the verifier sees it */
			asm volatile("" : "+r"(n));
			n &= NAME_LEN - 1;
			bpf_probe_read_user(e->written, n, written);
		}
		bpf_ringbuf_submit(e, 0);
	}
	return -EBUSY;
}

/* The interface usbfs's usb_ifnum_to_if would find for ifnum, if a guarded driver has it. */
static __always_inline struct usb_interface *guarded_ifnum(struct usb_device *udev, int ifnum,
							   char driver[NAME_LEN])
{
	struct usb_host_config *cfg = BPF_CORE_READ(udev, actconfig);
	struct usb_interface *intf;
	int n;

	if (!cfg)
		return NULL;
	n = BPF_CORE_READ(cfg, desc.bNumInterfaces);
	for (int i = 0; i < MAX_INTERFACES; i++) {
		if (i >= n)
			break;
		intf = NULL;
		bpf_core_read(&intf, sizeof(intf), &cfg->interface[i]);
		if (!intf)
			continue;
		if (BPF_CORE_READ(intf, altsetting, desc.bInterfaceNumber) != ifnum)
			continue;
		return intf_guarded(intf, driver) ? intf : NULL;
	}
	return NULL;
}

/* Any interface of the device with a guarded driver bound: its number, or -1. */
static __always_inline int any_guarded(struct usb_device *udev, char driver[NAME_LEN])
{
	struct usb_host_config *cfg = BPF_CORE_READ(udev, actconfig);
	struct usb_interface *intf;
	int n;

	if (!cfg)
		return -1;
	n = BPF_CORE_READ(cfg, desc.bNumInterfaces);
	for (int i = 0; i < MAX_INTERFACES; i++) {
		if (i >= n)
			break;
		intf = NULL;
		bpf_core_read(&intf, sizeof(intf), &cfg->interface[i]);
		if (intf && intf_guarded(intf, driver))
			return BPF_CORE_READ(intf, altsetting, desc.bInterfaceNumber);
	}
	return -1;
}

SEC("lsm/file_ioctl")
int BPF_PROG(guard_ioctl, struct file *file, unsigned int cmd, unsigned long arg, int ret)
{
	char driver[NAME_LEN];
	struct usb_dev_state *ps;
	struct usb_device *udev;
	__u32 kind;
	dev_t rdev;
	int ifnum, req[2];

	if (ret)
		return ret;
	if (cmd != USBDEVFS_IOCTL && cmd != USBDEVFS_IOCTL32 && cmd != USBDEVFS_DISCONNECT_CLAIM)
		return 0;
	rdev = BPF_CORE_READ(file, f_inode, i_rdev);
	if ((rdev >> MINORBITS) != USB_DEVICE_MAJOR)
		return 0;
	if (!S_ISCHR(BPF_CORE_READ(file, f_inode, i_mode)))
		return 0;
	ps = BPF_CORE_READ(file, private_data);
	if (!ps)
		return 0;
	udev = BPF_CORE_READ(ps, dev);
	if (!udev)
		return 0;
	/*
	 * Both argument structures start with the interface number; USBDEVFS_IOCTL's second
	 * field is the request it carries.  What user memory says now is what usbfs copies
	 * right after this hook (see the README on a program racing its own memory).
	 */
	if (bpf_probe_read_user(req, sizeof(req), (void *)arg))
		return 0;	/* usbfs's own copy fails the same way: EFAULT, nothing detached */
	ifnum = req[0];
	if (cmd == USBDEVFS_DISCONNECT_CLAIM) {
		kind = KIND_DISCONNECT_CLAIM;
	} else if ((__u32)req[1] == USBDEVFS_CONNECT) {
		/* usbfs binds whatever driver matches an interface without one
		 * (libusb_attach_kernel_driver): not on a device safeusb handed over */
		if (!device_handed_over(udev))
			return 0;
		__builtin_memset(driver, 0, sizeof(driver));
		return refuse(KIND_IOCTL_CONNECT, udev, ifnum, driver, NULL, 0);
	} else {
		if ((__u32)req[1] != USBDEVFS_DISCONNECT)
			return 0;
		kind = KIND_IOCTL_DISCONNECT;
	}
	if (!guarded_ifnum(udev, ifnum, driver))
		return 0;
	return refuse(kind, udev, ifnum, driver, NULL, 0);
}

static __always_inline int name_is(struct kernfs_node *kn, const char *want, int n)
{
	char buf[NAME_LEN];
	const char *s;

	__builtin_memset(buf, 0, sizeof(buf));
	if (!kn)
		return 0;
	s = BPF_CORE_READ(kn, name);
	if (!s || bpf_probe_read_kernel_str(buf, sizeof(buf), s) <= 0)
		return 0;
	return streq(buf, want, n);
}

/* x86-64 write(2) and pwrite64(2): the buffer and its length, for the report only. */
static __always_inline const char *written_buffer(__u32 *len)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	long nr;

	*len = 0;
	if (!regs)
		return NULL;
	nr = BPF_CORE_READ(regs, orig_ax);
	if (nr != 1 && nr != 18)
		return NULL;
	*len = (__u32)BPF_CORE_READ(regs, dx);
	return (const char *)BPF_CORE_READ(regs, si);
}

SEC("lsm/file_permission")
int BPF_PROG(guard_sysfs_write, struct file *file, int mask, int ret)
{
	struct kernfs_node *kn, *dir, *up;
	char driver[NAME_LEN];
	struct usb_device *udev;
	struct device *dev;
	struct kobject *kobj;
	const char *written;
	const char *tname;
	char type[16];
	__u32 kind, wlen;
	int ifnum;

	if (ret)
		return ret;
	if (!(mask & MAY_WRITE))
		return 0;
	if (BPF_CORE_READ(file, f_inode, i_sb, s_magic) != SYSFS_MAGIC)
		return 0;
	kn = BPF_CORE_READ(file, f_inode, i_private);
	if (!kn)
		return 0;
	dir = BPF_CORE_READ(kn, parent);
	if (!dir)
		return 0;

	if (name_is(kn, "unbind", 7)) {
		/* /sys/bus/usb/drivers/DRIVER/unbind of a guarded DRIVER */
		up = BPF_CORE_READ(dir, parent);
		if (!name_is(up, "drivers", 8) || !name_is(BPF_CORE_READ(up, parent), "usb", 4))
			return 0;
		if (!guarded_name(BPF_CORE_READ(dir, name), driver))
			return 0;
		written = written_buffer(&wlen);
		return refuse(KIND_SYSFS_UNBIND, NULL, -1, driver, written, wlen);
	}
	if (name_is(kn, "bind", 5) || name_is(kn, "new_id", 7)) {
		/*
		 * /sys/bus/usb/drivers/DRIVER/{bind,new_id} of a guarded DRIVER or of the
		 * generic usb driver, while any device is handed over.  Which interface is
		 * written is in the caller's memory and only copied after this hook, so it is not
		 * read to decide: every such write is refused until the give-back.
		 */
		up = BPF_CORE_READ(dir, parent);
		if (!name_is(up, "drivers", 8) || !name_is(BPF_CORE_READ(up, parent), "usb", 4))
			return 0;
		if (!guarded_name(BPF_CORE_READ(dir, name), driver) && !streq(driver, "usb", 4))
			return 0;
		if (!any_handed_over())
			return 0;
		kind = name_is(kn, "bind", 5) ? KIND_SYSFS_BIND : KIND_SYSFS_NEW_ID;
		written = written_buffer(&wlen);
		return refuse(kind, NULL, -1, driver, written, wlen);
	}
	if (name_is(kn, "drivers_probe", 14)) {
		/* /sys/bus/usb/drivers_probe: probes every driver for the device written */
		if (!name_is(dir, "usb", 4) || !name_is(BPF_CORE_READ(dir, parent), "bus", 4))
			return 0;
		if (!any_handed_over())
			return 0;
		__builtin_memset(driver, 0, sizeof(driver));
		written = written_buffer(&wlen);
		return refuse(KIND_SYSFS_PROBE, NULL, -1, driver, written, wlen);
	}
	if (name_is(kn, "authorized", 11))
		kind = KIND_SYSFS_AUTHORIZED;
	else if (name_is(kn, "remove", 7))
		kind = KIND_SYSFS_REMOVE;
	else if (name_is(kn, "bConfigurationValue", 20))
		kind = KIND_SYSFS_CONFIGURATION;
	else
		return 0;

	/* An attribute of a device's own directory: that directory's kernfs node holds the
	 * kobject, which is embedded in the struct device. */
	kobj = BPF_CORE_READ(dir, priv);
	if (!kobj)
		return 0;
	dev = (struct device *)((char *)kobj - bpf_core_field_offset(struct device, kobj));
	tname = BPF_CORE_READ(dev, bus, name);
	__builtin_memset(type, 0, sizeof(type));
	if (!tname || bpf_probe_read_kernel_str(type, sizeof(type), tname) <= 0 ||
	    !streq(type, "usb", 4))
		return 0;
	tname = BPF_CORE_READ(dev, type, name);
	__builtin_memset(type, 0, sizeof(type));
	if (!tname || bpf_probe_read_kernel_str(type, sizeof(type), tname) <= 0)
		return 0;
	if (streq(type, "usb_interface", 14)) {
		struct usb_interface *intf = (struct usb_interface *)
			((char *)dev - bpf_core_field_offset(struct usb_interface, dev));

		/* usb_device of an interface: its parent device */
		dev = BPF_CORE_READ(dev, parent);
		udev = (struct usb_device *)
			((char *)dev - bpf_core_field_offset(struct usb_device, dev));
		/* bound to a guarded driver (a detach), or of a device handed over (authorizing
		 * it again probes drivers) */
		if (!intf_guarded(intf, driver) && !device_handed_over(udev))
			return 0;
		return refuse(kind, udev, BPF_CORE_READ(intf, altsetting, desc.bInterfaceNumber),
			      driver, NULL, 0);
	}
	if (!streq(type, "usb_device", 11))
		return 0;
	udev = (struct usb_device *)((char *)dev - bpf_core_field_offset(struct usb_device, dev));
	ifnum = any_guarded(udev, driver);
	if (ifnum < 0) {
		/* a device handed over: a new configuration, authorizing it again or removing
		 * it (the hub enumerates it anew) would bring usb-storage back */
		if (!device_handed_over(udev))
			return 0;
		__builtin_memset(driver, 0, sizeof(driver));
	}
	return refuse(kind, udev, ifnum, driver, NULL, 0);
}

char LICENSE[] SEC("license") = "GPL";
